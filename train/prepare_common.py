"""What both data-preparation scripts share: BAAI's two-step resize, the vision tokenizer, resumable
atomic output that never mixes settings, and reporting unreadable images by name instead of aborting.

Images are prepared as BAAI's emu3/train/prepare_data.py prepares them: first scaled to about
`image_area` pixels (each side times sqrt(area / (w*h)), rounded, PIL's default filter), then
through the vision tokenizer's image processor, which rounds each side to a multiple of 8 within
its min/max pixels. Each feature file records what it was made from (settings, caption/answer,
source image size and time): a re-run skips the samples that are up to date, redoes the ones
whose caption, answer or image changed, and refuses to add to a directory prepared with other
settings.
"""

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from emu3 import backend
from emu3.weights import atomic_open
from train.dataset import read_listing, write_feature, write_listing
from emu3 import checks
from emu3.cli.outputs import locked

logger = logging.getLogger("train.prepare")

FAILED_FILE = "failed.json"
# What an image can fail with: missing, truncated, unreadable, too large for PIL, unsupported size.
IMAGE_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vq_path", required=True, help="Emu3-VisionTokenizer directory")
    parser.add_argument("--output", required=True, help="DATA_DIR: list/train.json and feature/ are written here")
    parser.add_argument("--image_area", type=int, default=720 * 720,
                        help="images are first resized (aspect kept) to about this many pixels, as BAAI's "
                             "prepare_data.py does: 720*720 gives 90x90 tokens; must lie within the image "
                             "processor's min_pixels..max_pixels")
    parser.add_argument("--mode", default="pynative", choices=["pynative", "graph"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])


def safe_name(name: str) -> str:
    bad = set('/\\\0') | {c for c in name if ord(c) < 32}
    if not name or name in (".", "..") or any(c in bad for c in name):
        raise ValueError(f"sample name {name!r} cannot be a file name (no '/', '\\', control characters)")
    return name


def area_size(width: int, height: int, area: int) -> tuple[int, int]:
    """BAAI's first resize: (width, height) scaled to about `area` pixels, each side rounded."""
    ratio = (area / (width * height)) ** 0.5  # BAAI's expression, so ties round the same way
    return int(round(width * ratio)), int(round(height * ratio))


class Tokenizing:
    """The image processor (read at once, to check the area) and the vision tokenizer (loaded on
    first use); `codes(path)` is the token grid of one image file."""

    def __init__(self, args):
        from emu3.tokenizer import Emu3VisionVQImageProcessor

        self.args = args
        self.processor = Emu3VisionVQImageProcessor.from_pretrained(args.vq_path)
        low, high = self.processor.min_pixels, self.processor.max_pixels
        if not low <= args.image_area <= high:
            raise ValueError(
                f"--image_area {args.image_area} lies outside [{low}, {high}], the min_pixels..max_pixels of "
                f"{Path(args.vq_path) / 'preprocessor_config.json'}: its image processor would rescale every "
                "image into that range (as BAAI's does). Choose an area in the range (Emu3 uses 720*720 = "
                "518400) or change min_pixels/max_pixels there"
            )
        self.model = None

    def settings(self, task: str) -> dict:
        """What decides a feature file's content besides its own sample: a re-run must match it."""
        p = self.processor
        return {"task": task, "image_area": self.args.image_area, "min_pixels": p.min_pixels,
                "max_pixels": p.max_pixels, "spatial_factor": p.spatial_factor}

    def pixels(self, image: Image.Image) -> np.ndarray:
        """(1, 3, H, W) tokenizer input of one image, resized twice as BAAI's prepare_data.py."""
        image = image.convert("RGB")
        # No resample argument: PIL's default filter, as BAAI's.
        image = image.resize(area_size(image.width, image.height, self.args.image_area))
        return self.processor(image, return_tensors="np")["pixel_values"]

    def codes(self, path: Path) -> np.ndarray:
        import mindspore as ms

        with Image.open(path) as image:
            image.load()
            pixels = self.pixels(image)
        if self.model is None:
            from emu3.tokenizer import Emu3VisionVQModel

            backend.set_run_mode(self.args.mode)
            self.model = Emu3VisionVQModel.from_pretrained(self.args.vq_path, dtype=self.args.dtype)
            self.model.set_train(False)
        return self.model.encode(ms.Tensor(pixels)).asnumpy()[0].astype(np.int32)


def source_record(image: Path) -> dict:
    """The source image as a feature file remembers it: a changed file makes the sample stale."""
    try:
        stat = Path(image).stat()
    except OSError:
        return {"image": str(image)}
    return {"image": str(image), "image_bytes": stat.st_size, "image_mtime_ns": stat.st_mtime_ns}


def _stored(path: Path) -> dict | None:
    """made_from, texts and response of an existing feature file; None if it has no record."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "made_from" not in data.files:
                return None
            return {"made_from": json.loads(str(data["made_from"])), "texts": str(data["texts"]),
                    "response": str(data["response"]) if "response" in data.files else None}
    except (OSError, ValueError, EOFError, KeyError):
        return None


def run(items: list[dict], args, describe: str, task: str) -> None:
    """items: {"name", "image" (path), "texts", optional "response"}; writes features + listing."""
    checks.integer("--image_area", args.image_area, low=1)
    out = Path(args.output)
    names = [safe_name(it["name"]) for it in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"sample names must be unique; repeated: {dupes[:10]}")
    out.mkdir(parents=True, exist_ok=True)
    with locked(out, "--output", f"data preparation ({describe})"):
        tokenizing = Tokenizing(args)
        settings = tokenizing.settings(task)
        if (out / "list" / "train.json").is_file():
            _refuse_other_settings(read_listing(out)[1], settings, out / "list" / "train.json")
        feature_dir = out / "feature"
        feature_dir.mkdir(parents=True, exist_ok=True)
        todo, changed, unrecorded = [], 0, 0
        for it in items:
            path = feature_dir / f"{it['name']}.npz"
            made_from = {"settings": settings, **source_record(it["image"])}
            if not path.is_file():
                todo.append((it, made_from))
                continue
            stored = _stored(path)
            if stored is None:
                unrecorded += 1
            else:
                _refuse_other_settings(stored["made_from"].get("settings"), settings, path)
                if (stored["made_from"], stored["texts"], stored["response"]) == (
                        made_from, it["texts"], it.get("response")):
                    continue
                changed += 1
            todo.append((it, made_from))
        if len(todo) < len(items) or changed or unrecorded:
            logger.info("%s: %d of %d samples up to date; %d changed since they were prepared (caption, answer "
                        "or image) and %d without a record of their source are prepared again",
                        out, len(items) - len(todo), len(items), changed, unrecorded)
        failed = _tokenize(todo, tokenizing, feature_dir, describe)
        done = [f"{n}.npz" for n in names if (feature_dir / f"{n}.npz").is_file()]
        if not done:
            raise ValueError(f"no sample could be prepared ({len(failed)} failed, listed in {out / FAILED_FILE})")
        write_listing(out, done, {**settings, "vq_path": str(Path(args.vq_path).resolve()), "dtype": args.dtype})
    if failed:
        logger.warning("%d samples skipped (listed in %s); re-run to retry them", len(failed), out / FAILED_FILE)
    logger.info("%d samples ready in %s", len(done), out)


def _tokenize(todo, tokenizing: Tokenizing, feature_dir: Path, describe: str) -> list[dict]:
    """Write the feature files of `todo`; failed.json lists this run's failures (empty if none)."""
    failed, last = [], (None, None)
    try:
        for it, made_from in tqdm(todo, desc=describe, unit="img"):
            path = feature_dir / f"{it['name']}.npz"
            try:
                # the samples of one VQA conversation share their image: tokenise it once
                codes = last[1] if last[0] == it["image"] else tokenizing.codes(Path(it["image"]))
            except IMAGE_ERRORS as err:
                # A missing, truncated or unreadable image (or one of unsupported size) costs only itself.
                logger.warning("skipping sample %r: image %s: %s", it["name"], it["image"], err)
                failed.append({"name": it["name"], "image": str(it["image"]), "error": str(err)})
                path.unlink(missing_ok=True)  # an older version of this sample must not stay listed
                continue
            last = (it["image"], codes)
            write_feature(path, it["name"], codes, it["texts"], it.get("response"), made_from)
    finally:
        with atomic_open(feature_dir.parent / FAILED_FILE, "w") as f:
            json.dump(failed, f, indent=1)
    return failed


def _refuse_other_settings(previous: dict | None, settings: dict, where: Path) -> None:
    if previous is None:
        return
    differ = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
    if differ:
        said = ", ".join(f"{k}={old!r} there, {new!r} now" for k, (old, new) in differ.items())
        raise ValueError(f"{where} was prepared with other settings ({said}); mixing them would give "
                         "samples of different grids or tasks. Prepare into a new --output, or delete the "
                         "old one to start again")


def read_json_list(path: Path, what: str) -> list:
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path} must hold a JSON list of {what}")
    return entries


def check_strings(path: Path, where: str, **fields) -> None:
    for key, value in fields.items():
        if not isinstance(value, str):
            raise ValueError(f"{path}: {where}: {key} must be a string, got {value!r}")


def resolve(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p
