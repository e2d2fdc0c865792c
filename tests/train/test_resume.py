"""Kill-and-resume gives the losses of an uninterrupted run; checkpoints are never half-written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from emu3.weights import read_safetensors
from train import checkpoint

from .conftest import grid, make_data, make_model_dir, run_sft

pytestmark = pytest.mark.slow


def test_kill_and_resume_continues_exactly(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    data = make_data(tmp_path / "data", [{"name": f"s{i}", "images": grid(i, 2, 2), "texts": f"sample {i}"}
                                         for i in range(3)])
    common = ["--model_path", str(model_dir), "--data_path", str(data), "--max_length", "20",
              "--max_steps", "6", "--lr", "5e-3", "--warmup_steps", "2", "--min_lr", "1e-4",
              "--null_prompt_prob", "0.5", "--save_steps", "2", "--save_total_limit", "2"]
    straight = run_sft(common, tmp_path / "straight")

    out = tmp_path / "killed"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "train.sft", *common, "--output_dir", str(out)], cwd=repo,
                            env={**os.environ, "GLOG_v": "3", "PYTHONPATH": str(repo)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while checkpoint.step_dir(out, 4).name not in [p.name for p in checkpoint.complete_checkpoints(out)]:
            assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # whatever the kill interrupted, every checkpoint directory that exists is whole
    for directory in checkpoint.complete_checkpoints(out):
        state = checkpoint.load_state(directory)
        arrays = read_safetensors(checkpoint.rank_file(directory, 0))
        assert {"optimizer.step", "data.position"} <= arrays.keys()
        assert int(arrays["optimizer.step"][0]) == state["step"]
    killed_at = checkpoint.load_state(checkpoint.latest_checkpoint(out))["step"]
    assert killed_at >= 4

    resumed = run_sft(common + ["--resume", "true"], out)
    after = {r["step"]: r for r in resumed[-(6 - killed_at):]}
    assert sorted(after) == list(range(killed_at + 1, 7))
    for step, record in after.items():
        reference = straight[step - 1]
        assert record["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-7), step
        assert record["lr"] == reference["lr"]
    final = [read_safetensors(checkpoint.rank_file(checkpoint.latest_checkpoint(d), 0)) for d in (out, tmp_path / "straight")]
    for key in final[0]:
        np.testing.assert_allclose(final[0][key], final[1][key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert len(checkpoint.complete_checkpoints(out)) == 2  # keeps the last K


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    barrier = checkpoint.Barrier(None)
    checkpoint.save(tmp_path, 1, 0, barrier, {"w": np.ones(3, np.float32)}, {"step": 1}, keep=3)

    def crash(*args):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, 0, barrier, {"w": np.zeros(3, np.float32)}, {"step": 2}, keep=3)
    monkeypatch.undo()
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-00000001"]
    assert not (checkpoint.step_dir(tmp_path, 2) / checkpoint.rank_file(".", 0).name).exists()
    np.testing.assert_array_equal(read_safetensors(checkpoint.rank_file(checkpoint.latest_checkpoint(tmp_path), 0))["w"], 1)
    checkpoint.save(tmp_path, 2, 0, barrier, {"w": np.zeros(3, np.float32)}, {"step": 2}, keep=1)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-00000002"]
    assert json.loads((checkpoint.latest_checkpoint(tmp_path) / "trainer_state.json").read_text()) == {"step": 2}
    assert not list(tmp_path.rglob("*.tmp"))
