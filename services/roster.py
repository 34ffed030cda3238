"""Replicas that have started, announced on the data folder the server and clients share.

The server settles the federation's size before round 1 from the clients connected then. A
replica is connected only once it has imported Flower (and warmed its forkserver), which on a
loaded host takes seconds and varies a lot between replicas started together, so "no client
joined for FL_JOIN_GRACE seconds" alone undercounts. A replica therefore announces itself the
moment its process starts, before any slow import: it creates ``<data dir>/roster/<identity>``
and holds an exclusive ``flock`` on it for its whole life. The server counts the entries whose
lock is held (the kernel releases it when the holder dies, however it dies, so a dead replica is
never counted) and waits until each of them has connected.

Only replicas that share the data folder can announce (compose's ``data`` volume, a local run's
data dir); on other hosts the join grace alone decides.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from services.locks import open_lock_file, try_lock

log = logging.getLogger("bouquet")

FOLDER = "roster"
LOCK_ATTEMPTS, LOCK_RETRY_S = 20, 0.01  # the server holds a stale entry's lock for microseconds
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def folder(data_dir: str | Path) -> Path:
    return Path(data_dir) / FOLDER


class Announcement:
    """A held roster entry; the lock goes when ``close()`` is called or the process dies."""

    def __init__(self, path: Path, handle: int) -> None:
        self.path = path
        self._handle: int | None = handle

    def close(self) -> None:
        """Withdraw the entry (a replica that ends cleanly leaves no file behind)."""
        if self._handle is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._handle)
        self._handle = None


def announce(data_dir: str | Path, identity: str) -> Announcement | None:
    """Create and lock this replica's entry; None (logged) where the folder is not writable or
    the identity cannot be a file name. Announcing is an optimisation of settling: never fatal."""
    if not _SAFE_NAME.fullmatch(identity):
        log.warning("identity %r cannot name a roster entry; the server will rely on FL_JOIN_GRACE for this client", identity)
        return None
    entries = folder(data_dir)
    path = entries / identity
    try:
        entries.mkdir(parents=True, exist_ok=True)
        for _ in range(LOCK_ATTEMPTS):
            handle = open_lock_file(path)
            if not try_lock(handle):  # the server checking a stale entry, or a live twin (below)
                os.close(handle)
                time.sleep(LOCK_RETRY_S)
                continue
            # The server may have removed a stale entry of the same name between our open and
            # our lock; then we hold a lock on a file nobody can see: try again.
            if _same_file(handle, path):
                return Announcement(path, handle)
            os.close(handle)
    except OSError as error:
        log.warning("could not announce this client in %s (%s); the server will rely on FL_JOIN_GRACE for it", entries, error)
        return None
    log.warning("another running client already announced the identity %r in %s; not announcing this one", identity, entries)
    return None


def live(data_dir: str | Path) -> set[str]:
    """Identities whose entry is locked by a running replica. Stale entries (their holder is
    gone) are removed on the way, under the lock, so a replica re-announcing is never lost."""
    entries = folder(data_dir)
    try:
        names = [entry.name for entry in entries.iterdir() if _SAFE_NAME.fullmatch(entry.name)]
    except FileNotFoundError:
        return set()
    alive = set()
    for name in names:
        try:
            handle = os.open(entries / name, os.O_RDONLY)
        except OSError:  # removed since the listing, or not ours to read
            continue
        try:
            taken = try_lock(handle)
        except OSError:  # not lockable: neither counted nor removed
            os.close(handle)
            continue
        if not taken:
            alive.add(name)
            os.close(handle)
            continue
        try:
            if _same_file(handle, entries / name):
                (entries / name).unlink()
        except OSError:
            pass
        finally:
            os.close(handle)
    return alive


def _same_file(handle: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)
