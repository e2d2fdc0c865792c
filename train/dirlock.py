"""One writer per directory: an exclusive lock that the operating system drops when its holder dies.

A second data preparation or training run aimed at a directory that is in use fails at once with a
message naming the holder, instead of interleaving its files with the first one's. The lock is an
flock on `DIR/.lock`: a killed holder never leaves a stale lock behind.
"""

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".lock"


class DirectoryLock:
    """Holds the lock on `directory` (created if absent) until `release()` or process exit."""

    def __init__(self, directory, purpose: str):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / LOCK_FILE
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise OSError(f"{directory} is in use by {holder} (lock {self.path}); wait for it to finish "
                          "or choose another directory") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{purpose} (pid {os.getpid()})")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
