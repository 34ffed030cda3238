"""GPU memory through NVML (nvidia-ml-py): per device used/total and utilisation, per process
the memory in the device's compute-process list. NVML reports host PIDs, which is why the
monitor needs ``pid: host`` in a container."""

from __future__ import annotations

from typing import Any

from services.monitor.readings import MIB, DeviceReading, ProcessReading, Reading

NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE for unsigned long long fields


class NvmlUnavailable(RuntimeError):
    """No NVML library, no driver, or no device: the caller falls back to host memory."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlReader:
    source = "nvml"

    def __init__(self, nvml: Any) -> None:
        """``nvml`` is the pynvml module (or a recorded stand-in); it must be initialised."""
        self.nvml = nvml
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        self.names = [_text(nvml.nvmlDeviceGetName(handle)) for handle in self.handles]

    def read(self) -> Reading:
        devices, processes = [], []
        for index, handle in enumerate(self.handles):
            memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization: float | None = float(self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except self.nvml.NVMLError:  # some devices (MIG slices, vGPUs) do not report it
                utilization = None
            devices.append(DeviceReading(str(index), self.names[index], memory.used / MIB, memory.total / MIB, utilization))
            by_pid: dict[int, float | None] = {}
            for entry in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used = entry.usedGpuMemory
                used_mib = None if used is None or used == NOT_AVAILABLE else used / MIB
                earlier = by_pid.get(entry.pid)
                by_pid[entry.pid] = used_mib if earlier is None else earlier + (used_mib or 0.0)  # one pid, several MIG slices
            processes += [ProcessReading(pid, str(index), used_mib) for pid, used_mib in by_pid.items()]
        return Reading(devices, processes)

    def facts(self) -> dict[str, Any]:
        """For memory_summary.json: the devices sampled."""
        return {"devices": [{"index": str(index), "name": name} for index, name in enumerate(self.names)]}

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


def open_nvml() -> NvmlReader:
    """Initialise NVML and return a reader, or raise NvmlUnavailable saying why not."""
    try:
        import pynvml
    except ImportError as error:
        raise NvmlUnavailable(f"nvidia-ml-py is not installed ({error})") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        raise NvmlUnavailable(f"NVML did not initialise: {error}") from None
    try:
        reader = NvmlReader(pynvml)
    except pynvml.NVMLError as error:
        pynvml.nvmlShutdown()
        raise NvmlUnavailable(f"NVML could not list devices: {error}") from None
    if not reader.handles:
        reader.close()
        raise NvmlUnavailable("NVML sees no GPU")
    return reader
