"""Merge a training checkpoint (ZeRO-3 shards or replicated) into a model directory that
`Emu3ForCausalLM.from_pretrained` loads: BAAI's original layout, config.json, and the tokenizer
files copied from the model the run started from.

    python -m train.merge_zero_shards --checkpoint OUTPUT_DIR/checkpoints/step-00000400 --output DIR
    python -m train.merge_zero_shards --checkpoint OUTPUT_DIR --output DIR   # the latest checkpoint

Reads one rank file at a time; optimizer moments are not copied.
"""

import argparse
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from emu3.weights import INDEX_FILE, SINGLE_FILE, CONFIG_FILE, write_checkpoint
from train import checkpoint
from train.zero import unshard_arrays

_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}
# Everything in a model directory except its weights and config: the tokenizer files etc.
_WEIGHT_FILES = (SINGLE_FILE, INDEX_FILE, CONFIG_FILE)


def merge(checkpoint_dir, output_dir, dtype: str = "fp32", max_shard_bytes: int | None = 5 * 2**30) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / checkpoint.STATE_FILE).is_file():
        latest = checkpoint.latest_checkpoint(checkpoint_dir)
        if latest is None:
            raise FileNotFoundError(f"{checkpoint_dir} is neither a checkpoint (step-N directory with "
                                    f"{checkpoint.STATE_FILE}) nor a run directory holding checkpoints/")
        checkpoint_dir = latest
    state = checkpoint.load_state(checkpoint_dir)
    shapes = {k: tuple(v) for k, v in state["full_shapes"].items()}
    ranks = state["world_size"] if state["zero_stage"] == 3 else 1
    pieces = {name: [] for name in shapes}
    for rank in tqdm(range(ranks), desc="reading rank files", disable=ranks == 1):
        arrays = checkpoint.load_rank(checkpoint_dir, rank)
        for name in shapes:
            if name not in arrays:
                raise ValueError(f"{checkpoint.rank_file(checkpoint_dir, rank)} lacks {name}")
            pieces[name].append(np.array(arrays[name]))
        del arrays
    target = _DTYPES[dtype]
    tensors = {name: unshard_arrays(parts, shapes[name]).astype(target) if ranks > 1
               else parts[0].reshape(shapes[name]).astype(target) for name, parts in pieces.items()}
    output_dir = Path(output_dir)
    write_checkpoint(tensors, output_dir, state["model_config"], max_shard_bytes)
    source = state["args"].get("tokenizer_path") or state["args"].get("model_path")
    if source and Path(source).is_dir():
        for f in Path(source).iterdir():
            if f.is_file() and f.name not in _WEIGHT_FILES and not f.name.startswith("model-"):
                shutil.copyfile(f, output_dir / f.name)
    return output_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step-N checkpoint directory, or a run's output_dir")
    parser.add_argument("--output", required=True, help="model directory to write")
    parser.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES), help="dtype of the written weights")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="split the weights into files of this size")
    args = parser.parse_args(argv)
    out = merge(args.checkpoint, args.output, args.dtype, int(args.max_shard_gb * 2**30))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
