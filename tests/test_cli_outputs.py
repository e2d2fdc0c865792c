"""emu3.cli.outputs: one run per output at a time, and images written whole."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from emu3.cli import outputs


def test_a_second_holder_is_refused_until_the_first_is_done(tmp_path):
    with outputs.locked(tmp_path, "--output-dir"):
        assert (tmp_path / outputs.DIRECTORY_LOCK).read_text() == f"pid {os.getpid()} on {os.uname().nodename}"
        with pytest.raises(OSError, match=rf"--output-dir {tmp_path} is in use by another run \(pid {os.getpid()}"):
            with outputs.locked(tmp_path, "--output-dir"):
                pass
    assert list(tmp_path.iterdir()) == []
    with outputs.locked(tmp_path / "answers.jsonl", "--output"):
        assert [p.name for p in tmp_path.iterdir()] == [".answers.jsonl.lock"]
        with outputs.locked(tmp_path, "--output-dir"):  # another output, another lock
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    lock = tmp_path / outputs.DIRECTORY_LOCK
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OSError, match="is in use by another run"):
            with outputs.locked(tmp_path, "--output-dir"):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()  # killed before it could clean up; the kernel released its lock
    with outputs.locked(tmp_path, "--output-dir"):
        pass


def test_images_are_written_whole_in_the_format_of_their_name(tmp_path):
    picture = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    outputs.save_image(picture, tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as written:
        assert written.format == "PNG"
        np.testing.assert_array_equal(np.asarray(written), np.asarray(picture))
    outputs.save_image(picture, tmp_path / "a.gif", save_all=True, append_images=[picture.rotate(90)], loop=0)
    with Image.open(tmp_path / "a.gif") as written:
        assert written.format == "GIF" and written.n_frames == 2
    with pytest.raises(ValueError, match="cannot tell an image format from the name"):
        outputs.save_image(picture, tmp_path / "a.unknown")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.png"]
