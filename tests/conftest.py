"""Shared test setup: MindSpore on CPU in PYNATIVE mode unless a test asks for GRAPH mode."""

import os

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logging: errors only

import mindspore as ms
import numpy as np
import pytest

from emu3 import backend

ms.set_context(device_target="CPU")


@pytest.fixture(autouse=True)
def pynative_by_default():
    backend.set_run_mode("pynative", "CPU")
    yield
    backend.set_run_mode("pynative", "CPU")


@pytest.fixture(params=["pynative", "graph"])
def run_mode(request):
    """Run the test once in each MindSpore execution mode."""
    backend.set_run_mode(request.param, "CPU")
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def torch_reference():
    """The PyTorch reference stack, imported once with deterministic CPU settings."""
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(2)
    return torch


@pytest.fixture
def compilations(monkeypatch):
    """A list that gets, for each GRAPH-mode compile call while the test runs, True when it built a
    new graph (False: the cached graph was reused); `sum(compilations)` counts the new graphs."""
    import mindspore.common.api as ms_api

    fresh = []
    compile_ = ms_api._cell_graph_executor.compile

    def counting_compile(*args, **kwargs):
        phase, new = compile_(*args, **kwargs)
        fresh.append(new)
        return phase, new

    monkeypatch.setattr(ms_api._cell_graph_executor, "compile", counting_compile)
    return fresh
