"""What compiled GRAPH-mode calls cost: the kernels a call launches (the figure that decides a
decode step's cost once its matmuls run at memory bandwidth: each kernel adds the runtime's launch
overhead), and how many graphs a piece of work compiles.

    counts = count_kernels(step, *inputs)   # Counter: op type -> kernels per call
    sum(counts.values())
    with compilations() as fresh:           # one bool per compile request, True for a new graph
        generate(...)
    sum(fresh)

It compiles and runs the cell once with MindSpore's IR dump on, into a temporary directory, and
reads the runtime's final actor set, which holds one kernel actor per kernel the call launches
(reshapes included: they are actors too, if cheap ones).
"""

import collections
import contextlib
import re
import tempfile
from pathlib import Path

import mindspore as ms
import mindspore.common.api as ms_api

from emu3 import backend

_KERNEL_ACTOR = re.compile(r"^%\d+ = kernel_graph\d+:(\w+?)-op\d+\(", re.MULTILINE)


def count_kernels(cell, *inputs) -> collections.Counter:
    """Kernels per call of `cell(*inputs)` by op type. The cell must not have been compiled for
    these input shapes yet (a compiled graph writes no IR); it runs once (a decode step writes its
    cache slot, as any step does)."""
    if backend.run_mode() != "graph":
        raise ValueError("count_kernels needs GRAPH mode (emu3.backend.set_run_mode('graph'))")
    with tempfile.TemporaryDirectory(prefix="emu3-ir-") as directory:
        ms.set_context(save_graphs=True, save_graphs_path=directory)
        try:
            cell(*inputs)
        finally:
            ms.set_context(save_graphs=False)
        actor_sets = sorted(Path(directory).rglob("final_actor_set_*.ir"))
        if not actor_sets:
            raise ValueError(f"{type(cell).__name__} was already compiled for these input shapes: count its kernels "
                             f"on a fresh cell, before its first call")
        return collections.Counter(m[1] for path in actor_sets for m in _KERNEL_ACTOR.finditer(path.read_text()))


@contextlib.contextmanager
def compilations():
    """A list that gets, for each GRAPH-mode compile request inside the block, True when it built a
    new graph (False: a cached graph was reused)."""
    executor = ms_api._cell_graph_executor
    compile_ = executor.compile
    fresh = []

    def counting(*args, **kwargs):
        phase, new = compile_(*args, **kwargs)
        fresh.append(new)
        return phase, new

    executor.compile = counting
    try:
        yield fresh
    finally:
        executor.compile = compile_
