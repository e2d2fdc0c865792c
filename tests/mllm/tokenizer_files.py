"""BAAI's tokenizer files with the real Qwen vocabulary (from the dashscope wheel), for tests."""

import importlib.util
import shutil
from pathlib import Path

from emu3.mllm.tokenizer import VISION_TOKENS_FILE, VOCAB_FILE, vision_token_names


def qwen_vocab_file() -> Path:
    return Path(importlib.util.find_spec("dashscope").origin).parent / "resources" / "qwen.tiktoken"


def write_tokenizer_files(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(qwen_vocab_file(), directory / VOCAB_FILE)
    (directory / VISION_TOKENS_FILE).write_text("\n".join(vision_token_names()) + "\n")
    return directory
