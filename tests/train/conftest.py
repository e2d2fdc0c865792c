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


def make_model_dir(directory: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Emu3 LLM in BAAI's layout plus the tokenizer files (the full 184,622 vocabulary)."""
    import mindspore as ms

    from emu3.mllm.config import Emu3Config
    from emu3.mllm.model import Emu3ForCausalLM

    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, attention_dropout=0.0, max_position_embeddings=512)
    ms.set_seed(seed)
    Emu3ForCausalLM(Emu3Config(**{**config, **overrides})).save_pretrained(directory)
    make_tokenizer_dir(directory)
    return directory


def run_sft(args: list[str], output_dir: Path, processes: int = 1, timeout: int = 300) -> list[dict]:
    """Run train.sft (under msrun for several processes); the rank-0 log records."""
    import json
    import os
    import socket
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "GLOG_v": "3", "PYTHONPATH": str(repo),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    args = [*args, "--output_dir", str(output_dir)]
    if processes == 1:
        cmd = [sys.executable, "-m", "train.sft", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log_dir = output_dir / "msrun_logs"
        cmd = [str(Path(sys.executable).parent / "msrun"), f"--worker_num={processes}",
               f"--local_worker_num={processes}", "--master_addr=127.0.0.1", f"--master_port={port}",
               "--join=True", f"--log_dir={log_dir}", str(repo / "train" / "sft.py"), *args]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        logs = "".join(p.read_text()[-3000:] for p in sorted((output_dir / "msrun_logs").glob("worker_*.log"))) \
            if processes > 1 else ""
        raise AssertionError(f"train.sft failed ({proc.returncode}):\n{out[-3000:]}\n{logs}")
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
