"""Which devices a worker may be placed on and how much memory each has free.

Behind one small interface (``devices()``) so tests can present fake GPUs (tests/fake_gpus.py). NVML is read in
the fresh worker before torch initialises CUDA (NVML needs no CUDA context); the client and
server processes never read it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

MIB = 2**20


@dataclass(frozen=True)
class Device:
    name: str  # "cuda:<NVML index>" or "cpu": what metrics.jsonl records
    visible_id: str = ""  # what CUDA_VISIBLE_DEVICES takes for it (the GPU's UUID); "" for the CPU
    total_mib: float = 0.0
    free_mib: float = 0.0
    cores: int = 0  # the CPU: cores this process may use

    @property
    def is_gpu(self) -> bool:
        return self.name.startswith("cuda")

    @property
    def index(self) -> str:
        return self.name.partition(":")[2]


class Inventory(Protocol):
    def devices(self) -> list[Device]:
        """The devices, each with its free memory now."""


class CpuInventory:
    def devices(self) -> list[Device]:
        return [Device("cpu", cores=cores_given())]


class NvmlInventory:
    """The GPUs NVML sees that this process may use (an existing CUDA_VISIBLE_DEVICES is honoured)."""

    def devices(self) -> list[Device]:
        import pynvml

        pynvml.nvmlInit()
        try:
            found = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                # A MIG-enabled GPU is not what CUDA enumerates (its slices are): leave CUDA's view alone.
                visible = "" if _mig_enabled(pynvml, handle) else uuid
                found.append(Device(f"cuda:{index}", visible, memory.total / MIB, memory.free / MIB))
        finally:
            pynvml.nvmlShutdown()
        return _allowed(found, os.environ.get("CUDA_VISIBLE_DEVICES"))


def _mig_enabled(pynvml, handle) -> bool:
    try:
        return bool(pynvml.nvmlDeviceGetMigMode(handle)[0])
    except Exception:  # not supported (no MIG on this GPU) or an older driver
        return False


def _allowed(devices: list[Device], visible: str | None) -> list[Device]:
    if visible is None or not visible.strip():
        return devices
    wanted = {item.strip() for item in visible.split(",") if item.strip()}
    return [d for d in devices if d.index in wanted or d.visible_id in wanted or any(d.visible_id.startswith(w) for w in wanted if w.startswith("GPU-"))]


def detect(device_setting: str) -> Inventory:
    """FL_DEVICE=cpu: the CPU. auto/cuda: the GPUs NVML sees, else the CPU (FL_DEVICE=cuda then
    fails in the task, which says torch sees no CUDA device)."""
    if device_setting == "cpu":
        return CpuInventory()
    try:
        gpus = NvmlInventory()
        if gpus.devices():
            return gpus
    except Exception:  # no nvidia-ml-py, no driver, no device: a CPU host
        pass
    return CpuInventory()


def cores_given() -> int:
    """Cores the host gives this process: its CPU affinity, capped by a cgroup CPU quota
    (``docker run --cpus`` / compose ``cpus:``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota() -> int | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]  # cgroup v2
        return None if quota == "max" else max(1, int(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())  # cgroup v1
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else max(1, quota // period)
    except (OSError, ValueError):
        return None
