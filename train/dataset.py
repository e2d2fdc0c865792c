"""SFT samples from prepared feature files: token ids, loss masks, padding and data order.

Data directory (written by prepare_vision_data.py / prepare_vqa_data.py):

    DATA_DIR/list/train.json   {"prefix": "<feature dir, absolute or relative to DATA_DIR>",
                                "path_list": ["<name>.npz", ...]}
    DATA_DIR/feature/<name>.npz  numpy archive (np.load(..., allow_pickle=False) reads it):
        name     str           the sample's name
        images   int32 (h, w)  vision-tokenizer codes of the image
        texts    str           T2I: the image's caption; VQA: the question
        response str           VQA only: the answer
        made_from str          JSON: the preparation settings and the source image (path, size,
                               mtime) the file was made from, so a re-run can tell stale files

Sequences (ids as Emu3's tokenizer would produce from the equivalent strings):
    T2I: bos + caption + IMAGE                         loss on the visual tokens only
    VQA: bos + "You are a helpful assistant. USER: " + IMAGE + question + ". ASSISTANT:"
         + response + eos                              loss on response + eos only
    IMAGE = boi + "{h}*{w}" + img + (h rows of w visual tokens, each followed by eol) + eof + eoi

Over-long samples (more than max_length tokens): the caption / question tokens are cut from
their end until the sequence fits; when even an empty caption / question does not fit (the image
or the answer alone is too long) the sample is skipped. Both events are counted and logged.
Sequences are right-padded to max_length (pad id, no loss), so every batch has one static shape.
"""

import json
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from emu3.weights import atomic_open
from train.trainer import IGNORE_INDEX

VQA_SYSTEM = "You are a helpful assistant. USER: "
VQA_ASSISTANT = ". ASSISTANT:"
CODEBOOK_SIZE = 32768  # visual tokens <|visual token 0..32767|>


def write_feature(path, name: str, images: np.ndarray, texts: str, response: str | None = None,
                  made_from: dict | None = None) -> None:
    """Write one feature file atomically (temporary file, fsync, rename)."""
    path = Path(path)
    arrays = {"name": np.array(name), "images": np.asarray(images, np.int32), "texts": np.array(texts)}
    if response is not None:
        arrays["response"] = np.array(response)
    if made_from is not None:
        arrays["made_from"] = np.array(json.dumps(made_from, sort_keys=True))
    with atomic_open(path) as f:
        np.savez(f, **arrays)


def write_listing(data_dir, files: list[str], settings: dict | None = None) -> None:
    """DATA_DIR/list/train.json naming every feature file (relative to DATA_DIR/feature) and the
    settings they were prepared with."""
    listing = Path(data_dir) / "list" / "train.json"
    listing.parent.mkdir(parents=True, exist_ok=True)
    meta = {"prefix": "feature", "path_list": files}
    if settings is not None:
        meta["settings"] = settings
    with atomic_open(listing, "w") as f:
        json.dump(meta, f, indent=1)


def read_feature(path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        sample = {"name": str(data["name"]), "images": data["images"].astype(np.int64),
                  "texts": str(data["texts"])}
        if "response" in data.files:
            sample["response"] = str(data["response"])
        if "made_from" in data.files:
            sample["made_from"] = json.loads(str(data["made_from"]))
    return sample


def read_listing(data_dir) -> tuple[list[Path], dict | None]:
    """(feature files, preparation settings or None) of a prepared data directory."""
    data_dir = Path(data_dir)
    listing = data_dir / "list" / "train.json"
    if not listing.is_file():
        raise FileNotFoundError(
            f"{listing} not found: prepare the data first with train/prepare_vision_data.py or "
            "train/prepare_vqa_data.py (they write DATA_DIR/list/train.json and DATA_DIR/feature/)"
        )
    try:
        meta = json.loads(listing.read_text())
        prefix = Path(meta["prefix"])
        names = meta["path_list"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{listing} is not a data listing ({type(err).__name__}: {err}); expected "
                         '{"prefix": ..., "path_list": [...]}') from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{listing}: path_list must be a list of file names")
    if not names:
        raise ValueError(f"{listing} lists no samples")
    prefix = prefix if prefix.is_absolute() else data_dir / prefix
    return [prefix / n for n in names], meta.get("settings")


def feature_files(data_dir) -> list[Path]:
    return read_listing(data_dir)[0]


def feature_problem(path: Path, task: str) -> str | None:
    """Why one feature file cannot train `task`, or None when it can."""
    if not path.is_file():
        return "missing"
    try:
        with np.load(path, allow_pickle=False) as data:
            fields = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    missing = [k for k in ("name", "images", "texts") if k not in fields]
    if missing:
        return f"lacks {missing}"
    images = fields["images"]
    if images.ndim != 2 or images.size == 0 or images.dtype.kind not in "iu":
        return f"images must be a non-empty 2-D integer grid, got {images.dtype} {images.shape}"
    if images.min() < 0 or images.max() >= CODEBOOK_SIZE:
        return f"images holds codes outside [0, {CODEBOOK_SIZE})"
    for key in ("texts", "response"):
        if key in fields and (fields[key].dtype.kind != "U" or fields[key].ndim != 0):
            return f"{key} must be a string"
    if task == "t2i" and "response" in fields:
        return "is VQA data (it has a response)"
    if task == "vqa" and "response" not in fields:
        return "is T2I data (it has no response)"
    return None


def check_data(data_dir, task: str) -> list[Path]:
    """Every listed feature file exists, is readable and holds `task`'s fields; else ValueError."""
    files, settings = read_listing(data_dir)
    prepared_for = (settings or {}).get("task")
    if prepared_for is not None and prepared_for != task:
        raise ValueError(f"{data_dir} holds {prepared_for.upper()} data but --task is {task}: "
                         f"use --task {prepared_for}, or data prepared for {task}")
    problems = {}
    for path in tqdm(files, desc="checking feature files", unit="file", disable=None):
        problem = feature_problem(path, task)
        if problem is not None:
            problems[path] = problem
    if problems:
        wrong_task = [p for p, why in problems.items() if why.startswith("is ")]
        if len(wrong_task) == len(files):
            other = "vqa" if task == "t2i" else "t2i"
            raise ValueError(f"{data_dir} holds {other.upper()} data but --task is {task}: "
                             f"use --task {other}, or data prepared for {task}")
        shown = "; ".join(f"{p}: {why}" for p, why in list(problems.items())[:5])
        raise ValueError(f"{len(problems)} of {len(files)} feature files listed in {data_dir} cannot train "
                         f"--task {task}: {shown}")
    return files


class SFTDataset:
    """Turns feature files into fixed-length training sequences for one task ("t2i" or "vqa")."""

    def __init__(self, data_dir, tokenizer, task: str, max_length: int, null_prompt_prob: float = 0.05,
                 seed: int = 0):
        if task not in ("t2i", "vqa"):
            raise ValueError(f"task must be 't2i' or 'vqa', got {task!r}")
        self.files = feature_files(data_dir)
        self.tok = tokenizer
        self.task = task
        self.max_length = max_length
        self.null_prompt_prob = null_prompt_prob
        self.seed = seed
        self.truncated = 0
        self.skipped = 0

    def __len__(self):
        return len(self.files)

    def image_ids(self, codes: np.ndarray) -> list[int]:
        h, w = codes.shape
        tok = self.tok
        visual = np.asarray(codes, np.int64) + tok.visual_token_id(0)
        rows = np.concatenate([visual, np.full((h, 1), tok.eol_token_id)], axis=1).reshape(-1)
        return ([tok.boi_token_id] + list(tok.encode(f"{h}*{w}")) + [tok.img_token_id]
                + rows.tolist() + [tok.eof_token_id, tok.eoi_token_id])

    def build(self, sample: dict, drop_prompt: bool = False):
        """(input_ids, labels) lists for one sample, or None when it cannot fit max_length."""
        tok = self.tok
        image = self.image_ids(sample["images"])
        if self.task == "t2i":
            head, tail, target = [tok.bos_token_id], [], image
            text = [] if drop_prompt else list(tok.encode(sample["texts"]))
        else:
            if "response" not in sample:
                raise ValueError(f"sample {sample['name']!r} has no response: is it a VQA feature file?")
            head = [tok.bos_token_id] + list(tok.encode(VQA_SYSTEM)) + image
            # question and ". ASSISTANT:" are one string to the tokenizer ("?." is one token)
            text, tail = list(tok.encode(sample["texts"] + VQA_ASSISTANT)), []
            target = list(tok.encode(sample["response"])) + [tok.eos_token_id]
        excess = len(head) + len(text) + len(tail) + len(target) - self.max_length
        if excess > 0:
            if self.task == "vqa":
                text, tail = list(tok.encode(sample["texts"])), list(tok.encode(VQA_ASSISTANT))
                excess = len(head) + len(text) + len(tail) + len(target) - self.max_length
            if excess > len(text):
                self.skipped += 1
                return None
            text = text[: len(text) - excess]
            self.truncated += 1
        ids = head + text + tail + target
        if self.task == "t2i":
            first, last = tok.visual_token_id(0), tok.visual_token_id(CODEBOOK_SIZE - 1)
            arr = np.asarray(ids)
            labels = np.where((arr >= first) & (arr <= last), arr, IGNORE_INDEX).tolist()
        else:
            labels = [IGNORE_INDEX] * (len(ids) - len(target)) + target
        return ids, labels

    def __getitem__(self, key):
        """key = (index, epoch): the padded arrays for that sample, or None if it is skipped."""
        index, epoch = key
        sample = read_feature(self.files[index])
        drop = self.task == "t2i" and drops_prompt(self.seed, epoch, index, self.null_prompt_prob)
        built = self.build(sample, drop_prompt=drop)
        if built is None:
            return None
        ids, labels = built
        pad = self.max_length - len(ids)
        input_ids = np.asarray(ids + [self.tok.pad_token_id] * pad, np.int32)
        labels = np.asarray(labels + [IGNORE_INDEX] * pad, np.int32)
        return {"input_ids": input_ids, "labels": labels, "name": sample["name"]}


def drops_prompt(seed: int, epoch: int, index: int, probability: float) -> bool:
    """Whether sample `index` gets an empty caption in `epoch` (seeded, so a resumed run agrees)."""
    return bool(np.random.default_rng([seed, epoch, index]).random() < probability)


def shift_labels(labels: np.ndarray) -> np.ndarray:
    """Position t gets the label of position t+1 (what the logits at t predict)."""
    shifted = np.full_like(labels, IGNORE_INDEX)
    shifted[..., :-1] = labels[..., 1:]
    return shifted


class DataLoader:
    """Batches for one data-parallel replica, in a seeded per-epoch shuffled order.

    Replica d takes positions d, d+dp, d+2dp, ... of the epoch's order; `position` (epoch, cursor)
    is all that is needed to continue exactly where a run stopped.
    """

    def __init__(self, dataset: SFTDataset, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.ds = dataset
        self.batch_size = batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.cursor = 0, 0
        self.per_replica = len(dataset) // dp_size
        if self.per_replica == 0:
            raise ValueError(f"{len(dataset)} samples cannot feed {dp_size} data-parallel replicas")

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.cursor

    def restore(self, position) -> None:
        self.epoch, self.cursor = int(position[0]), int(position[1])

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.ds)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def next_batch(self) -> dict:
        items, attempts = [], 0
        while len(items) < self.batch_size:
            if self.cursor >= self.per_replica:
                self.epoch, self.cursor = self.epoch + 1, 0
            index = int(self._order(self.epoch)[self.cursor * self.dp_size + self.dp_rank])
            self.cursor += 1
            item = self.ds[index, self.epoch]
            attempts += 1
            if item is not None:
                items.append(item)
            elif attempts > 2 * len(self.ds) + self.batch_size:
                raise ValueError(f"every sample is longer than max_length={self.ds.max_length}")
        batch = {k: np.stack([it[k] for it in items]) for k in ("input_ids", "labels")}
        batch["names"] = [it["name"] for it in items]
        return batch
