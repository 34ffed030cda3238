"""The one lock kit: ``flock`` file locks that the kernel drops when their holder dies, however it dies.

``flock`` is shared by every process on one kernel, containers included (the lock file sits on
a shared volume), and released when the holder's last descriptor closes: a SIGKILLed server,
replica, worker or monitor never leaves a stale lock behind, so nothing needs cleaning up before
a restart. Every lock in Bouquet goes through here: the run folder's owner (``HeldLock``), the
roster entries, the build-once cache and the need book (``exclusively``), the worker slots
(``open_lock_file`` / ``try_lock`` / ``lock`` / ``unlock`` on descriptors they keep).
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def open_lock_file(path: str | Path, mode: int = 0o664, shared_by_users: bool = False) -> int:
    """A descriptor on the lock file at ``path``, created if missing. ``shared_by_users``: make
    it writable by every user (replicas may run as different users); a file another user
    created without write access for us is opened read-only, which flock accepts as well."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 if shared_by_users else mode)
    except PermissionError:
        if not shared_by_users:
            raise
        return os.open(path, os.O_RDONLY)
    if shared_by_users:
        try:
            os.fchmod(fd, 0o666)
        except OSError:
            pass
    return fd


def try_lock(fd: int, exclusive: bool = True) -> bool:
    """Take the lock without waiting: True when taken, False when another holder has it."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise


def lock(fd: int, exclusive: bool = True) -> None:
    """Wait for the lock."""
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def exclusively(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block, waiting for it first."""
    fd = open_lock_file(path)
    try:
        lock(fd)
        yield
    finally:
        os.close(fd)  # closing releases it


class HeldLock:
    """An exclusive, non-blocking flock on ``path`` (created if missing), held until
    ``release()`` or the process's end."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> bool:
        """True when this process now holds the lock; False when another process does."""
        fd = open_lock_file(self.path)
        if not try_lock(fd):
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
        return not try_lock(fd, exclusive=False)
    finally:
        os.close(fd)
