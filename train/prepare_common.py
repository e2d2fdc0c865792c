"""What both data-preparation scripts share: the vision tokenizer, resumable atomic output, and
reporting unreadable images by name instead of aborting.
"""

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from emu3 import backend
from train.dataset import feature_files, write_feature, write_listing

logger = logging.getLogger("train.prepare")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vq_path", required=True, help="Emu3-VisionTokenizer directory")
    parser.add_argument("--output", required=True, help="DATA_DIR: list/train.json and feature/ are written here")
    parser.add_argument("--image_area", type=int, default=720 * 720,
                        help="images are resized (aspect kept) to about this many pixels: 720*720 gives 90x90 tokens")
    parser.add_argument("--mode", default="pynative", choices=["pynative", "graph"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])


def safe_name(name: str) -> str:
    bad = set('/\\\0') | {c for c in name if ord(c) < 32}
    if not name or name in (".", "..") or any(c in bad for c in name):
        raise ValueError(f"sample name {name!r} cannot be a file name (no '/', '\\', control characters)")
    return name


class Tokenizing:
    """Loads the vision tokenizer once; `codes(path)` is the token grid of one image file."""

    def __init__(self, args):
        from emu3.tokenizer import Emu3VisionVQImageProcessor, Emu3VisionVQModel

        backend.set_run_mode(args.mode)
        self.processor = Emu3VisionVQImageProcessor.from_pretrained(args.vq_path)
        # Fix the token count: every image is scaled to about image_area pixels.
        self.processor.min_pixels = self.processor.max_pixels = args.image_area
        self.model = Emu3VisionVQModel.from_pretrained(args.vq_path, dtype=args.dtype)
        self.model.set_train(False)

    def codes(self, path: Path) -> np.ndarray:
        import mindspore as ms

        with Image.open(path) as image:
            image.load()
            pixels = self.processor(image.convert("RGB"), return_tensors="np")["pixel_values"]
        return self.model.encode(ms.Tensor(pixels)).asnumpy()[0].astype(np.int32)


def run(items: list[dict], args, describe: str) -> None:
    """items: {"name", "image" (path), "texts", optional "response"}; writes features + listing."""
    out = Path(args.output)
    feature_dir = out / "feature"
    feature_dir.mkdir(parents=True, exist_ok=True)
    names = [safe_name(it["name"]) for it in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"sample names must be unique; repeated: {dupes[:10]}")
    todo = [it for it in items if not (feature_dir / f"{it['name']}.npz").is_file()]
    if len(todo) < len(items):
        logger.info("%d of %d samples already prepared in %s: resuming", len(items) - len(todo), len(items), feature_dir)
    failed = []
    if todo:
        tokenizing = Tokenizing(args)
        for it in tqdm(todo, desc=describe, unit="img"):
            try:
                codes = tokenizing.codes(Path(it["image"]))
            except (OSError, UnidentifiedImageError, ValueError) as err:
                # A missing, truncated or unreadable image (or one of unsupported size) costs only itself.
                logger.warning("skipping sample %r: image %s: %s", it["name"], it["image"], err)
                failed.append(it["name"])
                continue
            write_feature(feature_dir / f"{it['name']}.npz", it["name"], codes, it["texts"], it.get("response"))
    done = [f"{n}.npz" for n in names if (feature_dir / f"{n}.npz").is_file()]
    write_listing(out, done)
    feature_files(out)  # validates what was just written
    if failed:
        (out / "failed.json").write_text(json.dumps(failed, indent=1))
        logger.warning("%d samples skipped (listed in %s); re-run to retry them", len(failed), out / "failed.json")
    logger.info("%d samples ready in %s", len(done), out)


def resolve(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p
