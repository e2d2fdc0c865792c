"""Training checkpoints: atomic, per rank, the last K kept.

    OUTPUT_DIR/checkpoints/step-00000100/
        rank-00000.safetensors   this rank's parameters (ZeRO-3: its flat shards), AdamW moments
                                 ("optimizer.m.*", "optimizer.v.*", "optimizer.step"), its data
                                 position ("data.position" = [epoch, cursor]), its random-generator
                                 state ("rng.mindspore") and which checkpoint it belongs to
                                 ("checkpoint.step", "checkpoint.run")
        trainer_state.json       step, run id, loss scale, world / sequence-parallel sizes, ZeRO stage,
                                 full parameter shapes and the model config (for merging shards)

A checkpoint is first written to `step-N.tmp/` (every file itself via temp file + rename), all
ranks meet, then rank 0 renames the directory to `step-N/`. A directory without `.tmp` is
therefore always complete; a run killed mid-save leaves only a `.tmp` directory, which is ignored
and cleared by the next save. Every rank file names its step and run, so a directory assembled
from files of different saves or runs is refused (`verify`) instead of merged or resumed.
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
STEP_KEY, RUN_KEY = "checkpoint.step", "checkpoint.run"
DAMAGED_SUFFIX = ".damaged"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class DamagedCheckpoint(ValueError):
    """A checkpoint directory whose files are missing, unreadable or from different saves."""


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
         keep: int, run_id: str) -> Path:
    """Write this rank's tensors (and, on rank 0, `state`) as checkpoint `step` of run `run_id`;
    prune to the last `keep` (0 keeps all)."""
    final = step_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    tensors = {**tensors, STEP_KEY: np.array([step], np.int64), RUN_KEY: _run_array(run_id)}
    write_safetensors({k: np.asarray(v) for k, v in tensors.items()}, rank_file(tmp, rank))
    barrier()
    if rank == 0:
        _write_json_atomic(tmp / STATE_FILE, {**state, "step": step, "run_id": run_id})
        if final.exists():  # re-saving a step after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    barrier()
    return final


def _run_array(run_id: str) -> np.ndarray:
    return np.frombuffer(run_id.encode("ascii"), np.uint8).copy()


def load_state(directory) -> dict:
    path = Path(directory) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedCheckpoint(f"{path} is not valid JSON ({err})") from None
    missing = [k for k in ("step", "run_id", "world_size", "sp_size", "zero_stage", "full_shapes", "model_config",
                           "model", "args") if k not in state]
    if missing:
        raise DamagedCheckpoint(f"{path} lacks {missing}")
    return state


def load_rank(directory, rank: int, state: dict) -> dict[str, np.ndarray]:
    """Rank `rank`'s tensors, checked to belong to the checkpoint that `state` describes."""
    path = rank_file(directory, rank)
    if not path.is_file():
        raise DamagedCheckpoint(f"{path} is missing: checkpoint {directory} was written by a different number "
                                "of ranks or is incomplete")
    try:
        arrays = read_safetensors(path)
    except ValueError as err:  # WeightsError: truncated or not safetensors
        raise DamagedCheckpoint(str(err)) from None
    if STEP_KEY not in arrays or RUN_KEY not in arrays:
        raise DamagedCheckpoint(f"{path} does not say which checkpoint it belongs to ({STEP_KEY}, {RUN_KEY})")
    step, run = int(arrays[STEP_KEY][0]), bytes(arrays[RUN_KEY]).decode("ascii", "replace")
    if (step, run) != (state["step"], state["run_id"]):
        raise DamagedCheckpoint(f"{path} belongs to step {step} of run {run}, but {directory / STATE_FILE} "
                                f"describes step {state['step']} of run {state['run_id']}: the directory mixes "
                                "files of different saves")
    return arrays


def verify(directory) -> dict:
    """The state of a checkpoint whose state file and every rank file are readable and belong
    together; DamagedCheckpoint otherwise. Reads headers only (the tensors are memory-mapped)."""
    directory = Path(directory)
    state = load_state(directory)
    for rank in range(state["world_size"]):
        load_rank(directory, rank, state)
    extra = sorted(p.name for p in directory.glob("rank-*.safetensors")
                   if p.name not in {rank_file(directory, r).name for r in range(state["world_size"])})
    if extra:
        raise DamagedCheckpoint(f"{directory} holds rank files of a larger run ({extra[:3]}) beside its "
                                f"{state['world_size']}")
    return state


def newest_intact(output_dir) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that `verify` accepts or None, [(newer damaged checkpoint, why)])."""
    damaged = []
    for directory in reversed(complete_checkpoints(output_dir)):
        try:
            verify(directory)
        except DamagedCheckpoint as err:
            damaged.append((directory, str(err)))
            continue
        return directory, damaged
    return None, damaged


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
