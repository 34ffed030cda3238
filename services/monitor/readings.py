"""What one look at memory returns, and the small interface every memory source implements.

The sampler only knows this interface, so the attribution and summary logic can be driven by
recorded readings in tests, and the NVML and host-memory sources are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

MIB = 1024 * 1024


@dataclass(frozen=True)
class DeviceReading:
    index: str  # "0", "1", ... for GPUs; "host" for host memory
    name: str
    used_mib: float
    total_mib: float | None
    utilization_pct: float | None = None


@dataclass(frozen=True)
class ProcessReading:
    pid: int
    device: str
    memory_mib: float | None  # None: the driver did not say (NVML can withhold it)


@dataclass(frozen=True)
class Reading:
    devices: list[DeviceReading] = field(default_factory=list)
    processes: list[ProcessReading] = field(default_factory=list)


class MemoryReader(Protocol):
    source: str  # "nvml" or "host": written into every row and the summary

    def read(self) -> Reading: ...

    def facts(self) -> dict[str, Any]: ...  # for memory_summary.json: "devices", and what the numbers measure

    def close(self) -> None: ...
