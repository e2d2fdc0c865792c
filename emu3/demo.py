"""Tiny random-initialised Emu3 checkpoints, so the whole pipeline runs on a machine without weights.

`demo_checkpoints()` builds, once, a language-model directory and a vision-tokenizer directory in
BAAI's original layout (the files Emu3-Gen and Emu3-VisionTokenizer ship, same names and keys,
only much smaller and with random weights) and caches them under ~/.cache/emu3-mindspore/demo
(or $EMU3_DEMO_DIR). The text tokenizer is the real one: the Qwen vocabulary that the dashscope
wheel ships as qwen.tiktoken is Emu3's emu3.tiktoken. The images and answers such weights give
are noise; they show that every stage runs, nothing more.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from emu3.mllm.config import Emu3Config
from emu3.mllm.model import Emu3ForCausalLM
from emu3.mllm.tokenizer import VISION_TOKENS_FILE, Emu3Tokenizer, vision_token_names
from emu3.tokenizer import Emu3VisionVQConfig, Emu3VisionVQImageProcessor, Emu3VisionVQModel

# Bump when the demo's files change, so an old cache is not reused.
DEMO_VERSION = "v1"
LLM_DIR = "Emu3-Demo"
VQ_DIR = "Emu3-VisionTokenizer-Demo"

# Emu3's real vocabulary and context window, a tiny decoder; images of 64x64 pixels (8x8 tokens).
DEMO_LLM_CONFIG = dict(
    vocab_size=184622, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=9216, image_area=64 * 64,
)
DEMO_VQ_CONFIG = dict(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[3])
# Understanding-mode images are resized to between 64x64 and 128x128 pixels (at most 16x16 tokens).
DEMO_IMAGE_PIXELS = dict(min_pixels=64 * 64, max_pixels=128 * 128)


def demo_root() -> Path:
    base = os.environ.get("EMU3_DEMO_DIR") or Path.home() / ".cache" / "emu3-mindspore" / "demo"
    return Path(base) / DEMO_VERSION


def qwen_vocab_file() -> Path:
    spec = importlib.util.find_spec("dashscope")
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "the demo needs the Qwen vocabulary that the dashscope wheel ships (dashscope/resources/"
            "qwen.tiktoken): run `pip install dashscope==2.0.2`, or pass real Emu3 weights directories"
        )
    return path


def demo_checkpoints() -> tuple[Path, Path]:
    """(llm_dir, vq_dir) of the tiny random demo checkpoints, built on first use and cached."""
    root = demo_root()
    if not (root / LLM_DIR).is_dir() or not (root / VQ_DIR).is_dir():
        if root.exists():
            # Not one of our atomic builds (someone removed part of it): start again.
            shutil.rmtree(root)
        _build(root)
    return root / LLM_DIR, root / VQ_DIR


def _build(root: Path) -> None:
    # Built in a temporary sibling and renamed into place: a killed build leaves no half cache,
    # and of two concurrent builds the first rename wins.
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-building-", dir=root.parent))
    try:
        write_demo_llm(tmp / LLM_DIR)
        write_demo_vq(tmp / VQ_DIR)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / LLM_DIR).is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_demo_tokenizer(directory: Path) -> Emu3Tokenizer:
    """BAAI's three tokenizer files with the real vocabulary; returns the tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / VISION_TOKENS_FILE).write_text("".join(t + "\n" for t in vision_token_names()))
    tokenizer = Emu3Tokenizer(qwen_vocab_file(), directory / VISION_TOKENS_FILE)
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_demo_llm(directory: Path) -> None:
    Emu3ForCausalLM(Emu3Config(**DEMO_LLM_CONFIG)).save_pretrained(directory)
    write_demo_tokenizer(directory)


def write_demo_vq(directory: Path) -> None:
    Emu3VisionVQModel(Emu3VisionVQConfig(**DEMO_VQ_CONFIG)).save_pretrained(directory)
    Emu3VisionVQImageProcessor(**DEMO_IMAGE_PIXELS).save_pretrained(directory)
