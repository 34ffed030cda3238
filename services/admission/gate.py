"""Admission of one worker, run inside the fresh worker process before its job is imported.

The worker reads the inventory (NVML, before torch initialises CUDA), waits for a free slot on
the device with the most free slots (ties: the most free memory), restricts itself to that GPU
(CUDA_VISIBLE_DEVICES, set before CUDA is initialised in this process) and caps its CUDA
allocator to its share, so one greedy worker fails itself rather than its neighbours. The slot
is held until the process exits. After the job, a GPU worker measures what it needed and
remembers it for the sizing of later workers.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from services.admission.inventory import MIB, Device, Inventory, detect
from services.admission.sizing import NeedBook, Sizing, size
from services.admission.slots import DeviceSlots

INVENTORY_REFRESH_SECONDS = 1.0  # a waiting worker re-reads free memory this often
CONTEXT_MIB = 500.0  # a CUDA context when NVML cannot attribute memory to this process (no pid: host)


@dataclass(frozen=True)
class Admission:
    """How a worker is admitted: built by the client or server from its settings, sent to the
    worker with its job (it pickles; ``inventory`` None means detect it in the worker)."""

    slots_dir: str
    slots: str | int = "auto"  # FL_WORKER_SLOTS
    memory_mib: float | None = None  # FL_WORKER_MEMORY_MIB: overrides the measured need
    device: str = "auto"  # FL_DEVICE
    need_key: str = "default"  # which task and job the remembered need belongs to
    exclusive: bool = False  # hold the whole device (the retry after a CUDA out-of-memory)
    inventory: Inventory | None = None
    poll_seconds: float = 0.05
    waiting_for: str = "a slot (FL_WORKER_SLOTS)"  # services.worker names it when the wait times out

    def enter(self) -> "Ticket":
        """services.worker's seam before the job: wait for a slot, confine this process to its device."""
        ticket = admit(self)
        enter(ticket)
        return ticket

    def need(self) -> tuple[float | None, bool]:
        """(need in MiB or None, whether it was measured rather than set)."""
        if self.memory_mib:
            return float(self.memory_mib), False
        return NeedBook(self.slots_dir).read(self.need_key), True


@dataclass
class Ticket:
    device: Device
    sizing: Sizing
    wait_seconds: float
    started_at: float  # epoch seconds at which the slot was held
    descriptors: list[int] = field(default_factory=list)  # closed by the kernel when the worker exits
    admission: Admission | None = None  # what admitted it: after_job remembers the need there

    def record(self) -> dict[str, Any]:
        return {
            "device": self.device.name,
            "slots": self.sizing.slots if self.sizing.slots is not None else "unlimited",
            "slot_wait_seconds": round(self.wait_seconds, 4),
            "worker_started_at": round(self.started_at, 4),
            "share_mib": None if self.sizing.share_mib is None else round(self.sizing.share_mib, 1),
            "sizing": self.sizing.reason,
        }

    def after_job(self) -> None:
        if self.admission is not None:
            remember(self.admission, self)


def admit(admission: Admission) -> Ticket:
    """Wait for a slot (in the worker); the slot is this process's until it exits."""
    asked = time.monotonic()
    inventory = admission.inventory or detect(admission.device)
    devices, read_at = inventory.devices(), time.monotonic()
    if not devices:
        raise RuntimeError("no device to place the worker on")
    folders = {device.name: DeviceSlots(admission.slots_dir, device.name) for device in devices}
    try:
        while True:
            need, measured = admission.need()
            if admission.slots == "unlimited":
                device = max(devices, key=lambda d: d.free_mib)
                return Ticket(device, size(device, "unlimited", need, 0, measured), 0.0, time.time(), admission=admission)
            if admission.exclusive:
                device = max(devices, key=lambda d: d.free_mib)
                sizing = size(device, admission.slots, need, 0, measured)
                held = folders[device.name].take_all()
                exclusive = Sizing(1, device.total_mib if device.is_gpu else None, f"the whole device (retry after out of memory; {sizing.reason})")
                return Ticket(device, exclusive, time.monotonic() - asked, time.time(), held, admission)
            choices = []
            for device in devices:
                folder = folders[device.name]
                held = folder.held()
                sizing = size(device, admission.slots, need, held, measured)
                if sizing.slots - held > 0 and not folder.reserved():
                    choices.append((sizing.slots - held, device.free_mib, device, sizing))
            for _, _, device, sizing in sorted(choices, key=lambda c: (c[0], c[1]), reverse=True):
                fd = folders[device.name].try_take(sizing.slots)
                if fd is not None:
                    return Ticket(device, sizing, time.monotonic() - asked, time.time(), [fd], admission)
            time.sleep(admission.poll_seconds)
            if time.monotonic() - read_at >= INVENTORY_REFRESH_SECONDS:
                devices, read_at = inventory.devices() or devices, time.monotonic()
    finally:
        for folder in folders.values():
            folder.close()


def enter(ticket: Ticket) -> None:
    """Confine this worker to its device before the job imports anything that initialises CUDA."""
    if not ticket.device.is_gpu:
        return
    if ticket.device.visible_id:  # empty for a MIG-enabled GPU: CUDA sees its slices as the container gives them
        os.environ["CUDA_VISIBLE_DEVICES"] = ticket.device.visible_id
    share = ticket.sizing.share_mib
    if share and ticket.device.total_mib:
        import torch  # the forkserver preloaded it; a spawn worker needs it for its job anyway

        if torch.cuda.is_available():  # false for fake devices, whose UUIDs CUDA does not know
            allocator = max(0.05, min(1.0, (share - CONTEXT_MIB) / ticket.device.total_mib))
            torch.cuda.set_per_process_memory_fraction(allocator, 0)


def measured_need_mib() -> float | None:
    """After the job: this worker's CUDA context plus its allocator's peak, or None when it did not use CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    peak = torch.cuda.max_memory_reserved(0) / MIB
    own = _own_nvml_mib()
    context = own - torch.cuda.memory_reserved(0) / MIB if own else CONTEXT_MIB
    return peak + max(context, 0.0)


def _own_nvml_mib() -> float | None:
    """The memory NVML attributes to this process now (context + allocator), when it can see our pid."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            uuid = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            for entry in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if entry.pid == os.getpid() and entry.usedGpuMemory:
                    return entry.usedGpuMemory / MIB
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None
    return None


def remember(admission: Admission, ticket: Ticket) -> None:
    """Record the need this GPU worker measured, for the sizing of the workers after it."""
    if admission.memory_mib or not ticket.device.is_gpu:
        return
    need = measured_need_mib()
    if need:
        NeedBook(admission.slots_dir).remember(admission.need_key, need)
