"""Slots as ``flock``-ed lock files: ``<slots dir>/<device>/slot-<i>.lock``.

flock works across containers that mount the same folder (one kernel) and is released by the
kernel when the holder's last descriptor closes, so a worker that exits, crashes or is
SIGKILLed frees its slot at once: nothing to clean up, nothing to leak. A holder keeps its
descriptor open until it exits.

A worker retrying after a CUDA out-of-memory asks for the whole device: it takes the device's
gate exclusively (new workers then pass the device by) and then every slot, waiting for the
holders to leave. Others look at the gate only for the instant of an attempt.
"""

from __future__ import annotations

import os
from pathlib import Path

from services.locks import lock, open_lock_file, try_lock, unlock
from services.settings import MAX_SLOTS  # an exclusive holder takes all of them


class DeviceSlots:
    """The lock files of one device."""

    def __init__(self, root: str | os.PathLike, device: str) -> None:
        self.folder = Path(root) / device.replace(":", "-")
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            os.chmod(self.folder, 0o777)
        except OSError:
            pass
        self._fds: dict[str, int] = {}  # kept open between attempts of one waiting worker

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            self._fds[name] = open_lock_file(self.folder / name, shared_by_users=True)
        return self._fds[name]

    @staticmethod
    def slot_name(index: int) -> str:
        return f"slot-{index}.lock"

    def held(self) -> int:
        """How many slots are held now (each tested without waiting; a free one is let go at once)."""
        count = 0
        existing = set(os.listdir(self.folder))  # one read of the folder, not a stat per possible slot
        for index in range(MAX_SLOTS):
            if self.slot_name(index) not in existing:
                continue
            fd = self._fd(self.slot_name(index))
            if try_lock(fd, exclusive=False):
                unlock(fd)
            else:
                count += 1
        return count

    def reserved(self) -> bool:
        """True while a worker holds (or waits for) the whole device."""
        gate = self._fd("gate.lock")
        if try_lock(gate, exclusive=False):
            unlock(gate)
            return False
        return True

    def try_take(self, limit: int) -> int | None:
        """Take a free slot among the first ``limit``; the held slot's descriptor, or None."""
        gate = self._fd("gate.lock")
        if not try_lock(gate, exclusive=False):
            return None
        try:
            for index in range(min(limit, MAX_SLOTS)):
                name = self.slot_name(index)
                fd = self._fd(name)
                if try_lock(fd):
                    del self._fds[name]  # the caller owns it now
                    return fd
            return None
        finally:
            unlock(gate)

    def take_all(self) -> list[int]:
        """Wait until this worker holds the whole device: the gate, then every slot."""
        gate = self._fd("gate.lock")
        lock(gate)
        held = [self._fds.pop("gate.lock")]
        for index in range(MAX_SLOTS):
            fd = self._fd(self.slot_name(index))
            lock(fd)
            held.append(self._fds.pop(self.slot_name(index)))
        return held

    def close(self) -> None:
        """Close the descriptors this worker does not hold (held ones belong to the caller)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
