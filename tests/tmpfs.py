"""A tiny tmpfs mounted for one test: a real full disk or a real read-only filesystem.

Mounting needs root (CAP_SYS_ADMIN); elsewhere the tests that need one are skipped.
"""

import contextlib
import os
import subprocess

import pytest


@contextlib.contextmanager
def mounted(directory, size_kib: int = 64, read_only: bool = False):
    directory.mkdir(parents=True, exist_ok=True)
    flags = f"size={size_kib}k" + (",ro" if read_only else "")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", flags, "tmpfs", str(directory)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


def fill(directory) -> None:
    """Write into `directory` until its filesystem has no block left."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
