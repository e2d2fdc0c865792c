"""The native AlltoAll / ReduceScatter branches of train.parallel and ZeRO-3's gather backward get
through MindSpore's type and shape inference (2 msrun processes: collectives need communication)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_native_collectives_fail_only_at_kernel_selection(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GLOG_v": "3", "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(Path(sys.executable).parent / "msrun"), "--worker_num=2", "--local_worker_num=2",
           "--master_addr=127.0.0.1", f"--master_port={port}", "--join=True", f"--log_dir={tmp_path}",
           str(REPO / "tests" / "ascend" / "collectives_check.py")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    logs = [(tmp_path / f"worker_{rank}.log").read_text() for rank in range(2)]
    assert done.returncode == 0, done.stdout[-3000:] + "".join(log[-3000:] for log in logs)
    expected = {"AllToAll": "AlltoAll", "AllToAll backward": "AlltoAll", "ReduceScatter": "ReduceScatter",
                "GatherParam backward": "ReduceScatter"}
    for log in logs:
        checks = dict(line[len("CHECK "):].split(": ", 1) for line in log.splitlines() if line.startswith("CHECK "))
        assert checks == expected
