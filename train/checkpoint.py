"""Training checkpoints: atomic, per rank, the last K kept.

    OUTPUT_DIR/checkpoints/step-00000100/
        rank-00000.safetensors   this rank's parameters (ZeRO-3: its flat shards), AdamW moments
                                 ("optimizer.m.*", "optimizer.v.*", "optimizer.step") and its data
                                 position ("data.position" = [epoch, cursor])
        trainer_state.json       step, loss scale, world / sequence-parallel sizes, ZeRO stage,
                                 full parameter shapes and the model config (for merging shards)

A checkpoint is first written to `step-N.tmp/` (every file itself via temp file + rename), all
ranks meet, then rank 0 renames the directory to `step-N/`. A directory without `.tmp` is
therefore always complete; a run killed mid-save leaves only a `.tmp` directory, which is ignored
and cleared by the next save.
"""

import json
import os
import re
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import ops

from emu3.weights import atomic_open, read_safetensors, to_numpy, write_safetensors

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def rank_file(directory, rank: int) -> Path:
    return Path(directory) / f"rank-{rank:05d}.safetensors"


def step_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def complete_checkpoints(output_dir) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(output_dir) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


class Barrier:
    """All ranks wait for each other (an AllReduce: CPU has no Barrier kernel)."""

    def __init__(self, group: str | None):
        self.op = ops.AllReduce(ops.ReduceOp.SUM, group=group) if group else None

    def __call__(self):
        if self.op is not None:
            self.op(ms.Tensor(np.ones(1, np.float32))).asnumpy()


def _write_json_atomic(path: Path, obj) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def save(output_dir, step: int, rank: int, barrier: Barrier, tensors: dict, state: dict | None,
         keep: int) -> Path:
    """Write this rank's tensors (and, on rank 0, `state`) as checkpoint `step`; prune to `keep`."""
    final = step_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write_safetensors({k: np.asarray(v) for k, v in tensors.items()}, rank_file(tmp, rank))
    barrier()
    if rank == 0:
        _write_json_atomic(tmp / STATE_FILE, state)
        if final.exists():  # re-saving a step after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    barrier()
    return final


def load_state(directory) -> dict:
    return json.loads((Path(directory) / STATE_FILE).read_text())


def load_rank(directory, rank: int) -> dict[str, np.ndarray]:
    path = rank_file(directory, rank)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: checkpoint {directory} was written by a different number of ranks "
            "or is incomplete"
        )
    return read_safetensors(path)


def parameter_arrays(params) -> dict[str, np.ndarray]:
    return {p.name: to_numpy(p) for p in params}


def assign_arrays(params, arrays: dict[str, np.ndarray], source) -> None:
    """Set every parameter from `arrays` (same names, same shapes) or raise naming what is wrong."""
    missing = [p.name for p in params if p.name not in arrays]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensors, e.g. {missing[:5]}")
    for p in params:
        arr = arrays[p.name]
        if tuple(arr.shape) != tuple(p.shape):
            raise ValueError(f"{source}: {p.name} has shape {arr.shape}, the run expects {tuple(p.shape)}")
        p.set_data(ms.Tensor(np.array(arr, dtype=np.float32)).astype(p.dtype))
