"""Shared fixtures for the training tests: a real Emu3 tokenizer directory and feature data."""

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from emu3.mllm.tokenizer import Emu3Tokenizer, vision_token_names
from train.dataset import write_feature, write_listing


def make_tokenizer_dir(directory: Path) -> Path:
    """emu3.tiktoken (the Qwen vocabulary shipped by dashscope) + the vision token list."""
    directory.mkdir(parents=True, exist_ok=True)
    qwen = Path(importlib.util.find_spec("dashscope").origin).parent / "resources" / "qwen.tiktoken"
    shutil.copyfile(qwen, directory / "emu3.tiktoken")
    (directory / "emu3_vision_tokens.txt").write_text("".join(t + "\n" for t in vision_token_names()))
    return directory


def make_data(directory: Path, samples: list[dict]) -> Path:
    (directory / "feature").mkdir(parents=True, exist_ok=True)
    for s in samples:
        write_feature(directory / "feature" / f"{s['name']}.npz", s["name"], s["images"], s["texts"],
                      s.get("response"))
    write_listing(directory, [f"{s['name']}.npz" for s in samples])
    return directory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return Emu3Tokenizer.from_pretrained(tokenizer_dir, padding_side="right")


def grid(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 32768, (h, w)).astype(np.int32)
