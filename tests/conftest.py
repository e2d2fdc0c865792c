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
def compilations():
    """A list that gets, for each GRAPH-mode compile call while the test runs, True when it built a
    new graph (False: the cached graph was reused); `sum(compilations)` counts the new graphs."""
    from emu3.generation import kernels

    with kernels.compilations() as fresh:
        yield fresh
