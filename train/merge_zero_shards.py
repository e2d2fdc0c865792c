"""Merge a training checkpoint (ZeRO-3 shards or replicated) into a model directory that
`Emu3ForCausalLM.from_pretrained` loads: BAAI's original layout, config.json, and the tokenizer
files copied from the model the run started from.

    python -m train.merge_zero_shards --checkpoint OUTPUT_DIR/checkpoints/step-00000400 --output DIR
    python -m train.merge_zero_shards --checkpoint OUTPUT_DIR --output DIR   # the latest checkpoint

Reads one rank file at a time; optimizer moments are not copied. Every rank file must belong to
the same save of the same run. The model is written into a temporary directory beside DIR and
renamed into place when complete, so DIR never mixes files of two merges; an existing non-empty
DIR is replaced only with --overwrite, and never when it is the model the run was trained from or
holds the checkpoint itself.
"""

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from emu3.cli.errors import command
from emu3.weights import INDEX_FILE, SINGLE_FILE, CONFIG_FILE, write_checkpoint
from train import checkpoint
from emu3 import checks
from train.zero import unshard_arrays

logger = logging.getLogger("train.merge")

_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}
# Everything in a model directory except its weights and config: the tokenizer files etc.
_WEIGHT_FILES = (SINGLE_FILE, INDEX_FILE, CONFIG_FILE)


def merge(checkpoint_dir, output_dir, dtype: str = "fp32", max_shard_bytes: int | None = 5 * 2**30,
          overwrite: bool = False) -> Path:
    checkpoint_dir = _checkpoint_of(Path(checkpoint_dir))
    state = checkpoint.verify(checkpoint_dir)
    sources = [Path(p) for p in (state["model"], state["args"].get("tokenizer_path")) if p]
    output_dir = Path(output_dir)
    _check_output(output_dir, checkpoint_dir, sources, overwrite)
    shapes = {k: tuple(v) for k, v in state["full_shapes"].items()}
    ranks = state["world_size"] if state["zero_stage"] == 3 else 1
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.merging-", dir=output_dir.parent))
    try:
        pieces = {name: [] for name in shapes}
        for rank in tqdm(range(ranks), desc="reading rank files", disable=ranks == 1):
            arrays = checkpoint.load_rank(checkpoint_dir, rank, state)
            for name in shapes:
                if name not in arrays:
                    raise ValueError(f"{checkpoint.rank_file(checkpoint_dir, rank)} lacks {name}")
                pieces[name].append(np.array(arrays[name]))
            del arrays
        target = _DTYPES[dtype]
        tensors = {name: unshard_arrays(parts, shapes[name]).astype(target) if ranks > 1
                   else parts[0].reshape(shapes[name]).astype(target) for name, parts in pieces.items()}
        del pieces
        write_checkpoint(tensors, building, state["model_config"], max_shard_bytes)
        source = sources[-1]
        if source.is_dir():
            for f in source.iterdir():
                if f.is_file() and f.name not in _WEIGHT_FILES and not f.name.startswith("model-"):
                    shutil.copyfile(f, building / f.name)
        else:
            logger.warning("%s is gone: copy its tokenizer files into %s by hand", source, output_dir)
        _put_in_place(building, output_dir)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return output_dir


def _checkpoint_of(path: Path) -> Path:
    """A step-N directory as given, or a run's output directory's latest checkpoint."""
    if (path / checkpoint.STATE_FILE).is_file():
        return path
    found = checkpoint.complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} is neither a checkpoint (step-N directory with {checkpoint.STATE_FILE}) "
                                "nor a run directory holding checkpoints/")
    try:
        checkpoint.verify(found[-1])
    except checkpoint.DamagedCheckpoint as err:
        earlier = f"; merge an earlier one: --checkpoint {found[-2]}" if len(found) > 1 else ""
        raise checkpoint.DamagedCheckpoint(f"the latest checkpoint {found[-1]} is damaged ({err}){earlier}") from None
    return found[-1]


def _check_output(output: Path, checkpoint_dir: Path, sources: list[Path], overwrite: bool) -> None:
    out = output.resolve()
    for source in sources:
        if source.exists() and out == source.resolve():
            raise ValueError(f"--output {output} is the model the run was trained from: write the merged "
                             "model to a new directory")
    ckpt = checkpoint_dir.resolve()
    if out == ckpt or out in ckpt.parents or ckpt in out.parents:
        raise ValueError(f"--output {output} would hold or replace the checkpoint {checkpoint_dir}: write the "
                         "merged model elsewhere")
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"--output {output} is not empty ({', '.join(sorted(p.name for p in output.iterdir())[:4])}"
                         "...): choose a new directory, or pass --overwrite to replace it whole")


def _put_in_place(building: Path, output: Path) -> None:
    """Rename the finished model to `output`; a previous directory there is replaced whole."""
    if output.is_dir() and any(output.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.replaced-", dir=output.parent))
        os.replace(output, old / output.name)
        os.replace(building, output)
        shutil.rmtree(old)
    else:
        os.replace(building, output)


@command
def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step-N checkpoint directory, or a run's output_dir")
    parser.add_argument("--output", required=True, help="model directory to write (new or empty)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES), help="dtype of the written weights")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="split the weights into files of this size")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    args = parser.parse_args(argv)
    shard_gb = checks.real("--max_shard_gb", args.max_shard_gb, low=0, low_open=True)
    out = merge(args.checkpoint, args.output, args.dtype, max(1, int(shard_gb * 2**30)), args.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
