"""Where the commands write: checked before the work, used by one run at a time, written whole.

- `check_directory` / `check_file` run before any model is loaded: an output path that is a file
  where a directory is wanted (or the reverse), a directory that cannot be created or written
  (permissions, a read-only filesystem), or a disk without room for the outputs fails at once
  instead of after minutes of generation.
- `locked` holds an exclusive lock (flock on a small file beside the outputs) for the run: a
  second run aimed at the same outputs fails at once with a clear error. The kernel drops the
  lock when a process dies, so a killed run never leaves a stale lock behind.
- `save_image` writes a PIL image through `emu3.weights.atomic_open`: a full disk or a crash
  leaves the previous file as it was, never a partial or empty one.
"""

import contextlib
import fcntl
import os
import shutil
import socket
import tempfile
from pathlib import Path

from PIL import Image

from emu3.weights import atomic_open

# The lock of an output directory, inside it.
DIRECTORY_LOCK = ".emu3.lock"
# Room left for a run's small files (JSON, logs) beyond what it says it needs.
_SLACK_BYTES = 1 << 20


def check_directory(directory, option: str, needed_bytes: int = 0) -> Path:
    """Create `directory` if needed and make sure a file of `needed_bytes` (plus a little) fits in it."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{option} {directory} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise OSError(f"{option} {directory} cannot be written: {err.strerror or err}") from None
    free = shutil.disk_usage(directory).free
    if free < needed_bytes + _SLACK_BYTES:
        raise OSError(f"{option} {directory}: the disk has {free / 1e6:.1f} MB free, the outputs need about "
                      f"{(needed_bytes + _SLACK_BYTES) / 1e6:.1f} MB")
    return directory


def check_file(path, option: str, needed_bytes: int = 0) -> Path:
    """Make sure the file `path` can be written (replaced if it exists) before the work starts."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory: give a file name")
    check_directory(path.parent, f"the directory of {option}", needed_bytes)
    return path


def refuse_directories(paths) -> None:
    """Output files about to be written must not be directories already (the rename would fail at the end)."""
    taken = [str(p) for p in paths if Path(p).is_dir()]
    if taken:
        raise ValueError(f"cannot write {', '.join(taken)}: a directory of that name is in the way")


@contextlib.contextmanager
def locked(target, option: str, purpose: str | None = None):
    """Hold the lock of an output: a directory's lock file is inside it, a file's lock beside it.
    `purpose` (e.g. "training") is shown to a second run that finds the output in use."""
    target = Path(target)
    lock = target / DIRECTORY_LOCK if target.is_dir() else target.with_name(f".{target.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OSError(f"{option} {target} is in use by another run ({holder}): wait for it to finish or "
                          "choose another output") from None
        # The holder before us removes the lock file as it finishes: if it did so between our
        # open and our flock, we hold a lock on a removed file and must take a fresh one.
        try:
            if os.path.samestat(os.stat(lock), os.fstat(fd)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        os.write(fd, (f"{purpose}, {holder}" if purpose else holder).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def save_image(image: Image.Image, path, **params) -> None:
    """Write `image` to `path` whole or not at all, in the format its suffix names."""
    path = Path(path)
    Image.init()
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"cannot tell an image format from the name {path}")
    with atomic_open(path) as f:
        image.save(f, format=image_format, **params)
