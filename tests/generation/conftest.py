"""Fixtures shared by the generation tests."""

import mindspore.common.api as ms_api
import pytest


@pytest.fixture
def compilations(monkeypatch):
    """A list that gets one bool per graph compilation request (True: a new graph was compiled)."""
    compiled = []
    compile_ = ms_api._cell_graph_executor.compile

    def counting_compile(*args, **kwargs):
        phase, fresh = compile_(*args, **kwargs)
        compiled.append(fresh)
        return phase, fresh

    monkeypatch.setattr(ms_api._cell_graph_executor, "compile", counting_compile)
    return compiled
