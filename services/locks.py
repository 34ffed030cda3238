"""Exclusive file locks that the kernel drops when their holder dies, however it dies.

``flock`` is shared by every process on one kernel, containers included (the lock file sits on
a shared volume), and released when the holding process exits: a SIGKILLed server or monitor
never leaves a stale lock behind, so nothing needs cleaning up before a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class HeldLock:
    """An exclusive, non-blocking flock on ``path`` (created if missing), held until
    ``release()`` or the process's end."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> bool:
        """True when this process now holds the lock; False when another process does."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def is_held(path: str | Path) -> bool:
    """Whether some live process holds the lock on ``path`` right now."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
