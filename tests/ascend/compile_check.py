"""Checking Ascend-only code on the CPU.

MindSpore compiles a GRAPH-mode cell in two stages: type and shape inference over the whole graph,
then kernel selection for the device. With the Ascend switch of `emu3.backend` forced on, an
Ascend-only branch compiled on the CPU must therefore get through inference and fail only at
kernel selection, with "Unsupported op [X] on CPU", or, for an op the CPU has but not in that
dtype (bf16), "Kernel select failed: ... Select CPU operator[X] fail! Unsupported data type". Any
other error (a wrong dtype, a missing argument, a shape that does not fit) would fail the same way
on an NPU: it is a real bug.
"""

import contextlib
import re

from emu3 import backend

_UNSUPPORTED = re.compile(r"Unsupported op \[(\w+)\] on CPU"
                          r"|Kernel select failed:[\s\S]*?Select CPU operator\[(\w+)\] fail! Unsupported data type")


@contextlib.contextmanager
def ascend_switch():
    """Every `backend.on_ascend()` answers True inside, in GRAPH mode (the CPU stays the device).

    Cells read the switch when they are built and when they are compiled: build and call them inside.
    """
    saved = backend._ON_ASCEND
    backend.set_run_mode("graph", "CPU")
    backend._ON_ASCEND = True
    try:
        yield
    finally:
        backend._ON_ASCEND = saved
        backend.set_run_mode("pynative", "CPU")


def unsupported_on_cpu(cell, *inputs) -> str:
    """Compile and run `cell(*inputs)` (built and called under `ascend_switch`) and return the op that has
    no CPU kernel. Raises AssertionError when it runs, or fails for any other reason than a missing kernel."""
    try:
        cell(*inputs)
    except Exception as err:  # noqa: BLE001 - any other error is what this check exists to report
        match = _UNSUPPORTED.search(str(err))
        if match is None:
            raise AssertionError(f"the Ascend branch failed before kernel selection, so it would fail on an NPU "
                                 f"too:\n{type(err).__name__}: {str(err)[:3000]}") from err
        return match[1] or match[2]
    raise AssertionError("the Ascend branch ran on the CPU: it uses no Ascend-only kernel")
