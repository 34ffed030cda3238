"""GPUs that are not there, for the admission tests: any ``services.admission.inventory``
``Inventory`` will do for a worker's ``Admission``, so these present fixed free memory per device."""

from __future__ import annotations

from dataclasses import dataclass

from services.admission.inventory import Device


@dataclass(frozen=True)
class FakeGpus:
    """Devices ``cuda:0``, ``cuda:1``, ... with fixed free memory each (picklable: it travels to the worker)."""

    free_mib: tuple[float, ...]
    total_mib: float = 24576.0

    def devices(self) -> list[Device]:
        return [Device(f"cuda:{i}", f"GPU-fake-{i}", self.total_mib, free) for i, free in enumerate(self.free_mib)]
