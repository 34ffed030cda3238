"""How many slots a device has, and the memory one worker of this task needs.

FL_WORKER_SLOTS is ``auto`` (default), a number per device, or ``unlimited`` (no admission:
for comparison). ``auto`` on the CPU is the number of cores the host gives the process; on a
GPU it is the memory workers may use (free memory now plus what the slots already held are
counted to need) divided by one worker's need, never below 1. The need is FL_WORKER_MEMORY_MIB
when set, else what workers of this task measured (CUDA context + peak) and remembered in
``<slots dir>/need/``; before any worker measured it, a GPU gets one slot (the conservative
start: the first worker's measurement sizes the rest).
"""

from __future__ import annotations

import json
import os
import math
from dataclasses import dataclass
from pathlib import Path

from services.admission.inventory import Device
from services.files import write_json_atomically
from services.locks import exclusively
from services.settings import MAX_SLOTS

OOM_RAISE = 1.5  # after a CUDA out-of-memory, the remembered need grows by this factor


@dataclass(frozen=True)
class Sizing:
    slots: int | None  # None: unlimited
    share_mib: float | None  # the memory each admitted GPU worker may use; None on the CPU
    reason: str


def size(device: Device, setting: str | int, need_mib: float | None, held: int, measured: bool) -> Sizing:
    """The slots of ``device`` now; ``held`` slots are taken, ``measured`` says where the need came from."""
    if setting == "unlimited":
        return Sizing(None, None, "unlimited (FL_WORKER_SLOTS=unlimited): no admission")
    budget = device.free_mib + held * (need_mib or 0.0) if device.is_gpu else 0.0
    if isinstance(setting, int):
        share = budget / setting if device.is_gpu else None
        return Sizing(setting, share, f"{setting} per device (FL_WORKER_SLOTS)")
    if not device.is_gpu:
        return Sizing(device.cores, None, f"{device.cores}: the cores the host gives this container (FL_WORKER_SLOTS=auto)")
    if not need_mib:
        return Sizing(1, budget, f"1: {budget:.0f} MiB usable, a worker's need not measured yet (the first worker measures it)")
    slots = max(1, min(MAX_SLOTS, math.floor(budget / need_mib)))
    source = "FL_WORKER_MEMORY_MIB" if not measured else "measured by earlier workers"
    return Sizing(slots, budget / slots, f"{slots}: {budget:.0f} MiB usable / {need_mib:.0f} MiB per worker ({source})")


class NeedBook:
    """What one worker of each task needs, remembered on the shared slots folder."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.folder = Path(root) / "need"

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def read(self, key: str) -> float | None:
        try:
            return float(json.loads(self._path(key).read_text())["need_mib"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remember(self, key: str, need_mib: float) -> float:
        """Keep the larger of the remembered and the new need (a worker's peak varies); returns it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with exclusively(self.folder / ".lock"):
            kept = max(need_mib, self.read(key) or 0.0)
            write_json_atomically(self._path(key), {"need_mib": round(kept, 1)})
        return kept

    def raise_after_oom(self, key: str, share_mib: float | None) -> float:
        """A worker ran out of memory with ``share_mib``: it needs more than that."""
        base = max(self.read(key) or 0.0, share_mib or 0.0)
        return self.remember(key, base * OOM_RAISE if base else 0.0)
