"""The SFT launcher (scripts/t2i_sft_seq_parallel.sh -> sft_seq_parallel.sh -> msrun, 2 workers):
Ctrl-C and SIGTERM after the first step end msrun and every worker, and the exit status says so."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import grid, make_data, make_model_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (msrun, its scheduler, workers, log tails)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") \
                    and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_ends_every_worker_with_a_failure_status(tmp_path, sig):
    model_dir = make_model_dir(tmp_path / "model")
    data = make_data(tmp_path / "data", [{"name": f"s{i}", "images": grid(i, 2, 2), "texts": "t"} for i in range(2)])
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "NPROC": "2", "MODEL_PATH": str(model_dir), "DATA_PATH": str(data), "OUTPUT_DIR": str(out),
           "MASTER_PORT": str(port), "CONFIG": str(REPO / "configs" / "t2i_sft_tiny_cpu.yaml"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    console = open(tmp_path / "console.txt", "w")
    launcher = subprocess.Popen(["bash", str(REPO / "scripts" / "t2i_sft_seq_parallel.sh"), "--max_steps", "500",
                                 "--max_length", "32", "--save_steps", "500"],
                                cwd=tmp_path, env=env, stdout=console, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().strip()):
            assert launcher.poll() is None, (tmp_path / "console.txt").read_text()[-3000:]
            assert time.time() < deadline, "no training step within 300 s"
            time.sleep(0.2)
        assert len(processes_mentioning(str(out))) >= 3  # msrun, its scheduler and 2 workers
        if sig == signal.SIGINT:
            os.killpg(launcher.pid, sig)  # Ctrl-C: the terminal signals the foreground process group
        else:
            os.kill(launcher.pid, sig)  # kill PID: the launcher alone
        status = launcher.wait(timeout=60)
        assert status == 128 + sig
        time.sleep(0.5)
        assert processes_mentioning(str(out)) == [], "processes left running"
        assert "stopping msrun and its workers" in (tmp_path / "console.txt").read_text()
    finally:
        for pid in processes_mentioning(str(out)):
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        console.close()
