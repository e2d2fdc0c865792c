"""How many kernels a compiled GRAPH-mode call launches: the figure that decides a decode step's
cost once its matmuls run at memory bandwidth (each kernel adds the runtime's launch overhead).

    counts = count_kernels(step, *inputs)   # Counter: op type -> kernels per call
    sum(counts.values())

It compiles and runs the cell once with MindSpore's IR dump on, into a temporary directory, and
reads the runtime's final actor set, which holds one kernel actor per kernel the call launches
(reshapes included: they are actors too, if cheap ones).
"""

import collections
import re
import tempfile
from pathlib import Path

import mindspore as ms

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
