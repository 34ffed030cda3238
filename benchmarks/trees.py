"""Memory of each federation member's process tree (the member plus everything it started:
workers, a forkserver, ClientApp processes), for the benchmark (benchmarks.bench).

The benchmark needs per-member numbers for the Deployment Engine too, whose processes the
monitor's process table does not know, so it names the members itself (``members()``: member
name -> root pid, asked at every sample, so members that start late are picked up). Every
``interval`` seconds (the monitor's sampling loop, ``Periodic``): host RSS of each tree (cheap;
pages shared between processes, e.g. a forkserver's torch and its forked workers, count once
per process, as ``ps`` shows them), every ``pss_every``-th sample and every idle one its PSS
(shared pages split among their sharers: what the tree really costs the host, but reading smaps
costs ~4 ms per process), and, when NVML sees a GPU (the monitor's reader), the device memory
used by the tree's processes. A tree is *busy* in a sample when it has a worker process or used
more than a tenth of a core since the previous sample; otherwise *idle*.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import psutil

from services.monitor.nvml import NvmlReader, NvmlUnavailable, open_nvml
from services.monitor.readings import MIB
from services.monitor.sampler import Periodic

BUSY_CPU_FRACTION = 0.10


@dataclass(frozen=True)
class Sample:
    time: float  # time.time()
    member: str  # "server", "client-0", ...
    rss_bytes: int
    pss_bytes: int | None  # every pss_every-th sample and every idle one
    gpu_bytes: int | None
    processes: int
    workers: int
    busy: bool


def gpu_reader() -> NvmlReader | None:
    """The monitor's NVML reader, or None on a machine without a GPU (or its driver)."""
    try:
        return open_nvml()
    except NvmlUnavailable:
        return None


def gpu_name() -> str | None:
    """The first GPU's name as NVML gives it, or None on a machine without one."""
    reader = gpu_reader()
    if reader is None:
        return None
    reader.close()
    return reader.names[0]


class TreeSampler(Periodic):
    """``is_worker(process)`` says whether a process below a member's root does one round's work."""

    thread_name = "bench-sampler"

    def __init__(
        self,
        members: Callable[[], dict[str, int]],
        interval: float = 0.25,
        pss_every: int = 4,
        is_worker: Callable[[psutil.Process], bool] | None = None,
    ) -> None:
        super().__init__(interval)
        self.members = members
        self.pss_every = pss_every
        self._count = 0
        self.is_worker = is_worker or (lambda process: False)
        self.samples: list[Sample] = []
        self.device_used: list[tuple[float, int]] = []
        self.gpu: NvmlReader | None = None
        self._cpu: dict[int, float] = {}
        self._last = time.monotonic()

    def start(self) -> None:
        self.gpu = gpu_reader()
        super().start()

    def stop(self) -> None:
        super().stop()
        if self.gpu is not None:
            self.gpu.close()

    def sample_once(self) -> None:
        now, tick = time.time(), time.monotonic()
        elapsed, self._last = max(tick - self._last, 1e-3), tick
        gpu_by_pid: dict[int, int] = {}
        if self.gpu is not None:
            reading = self.gpu.read()
            self.device_used.append((now, round(sum(device.used_mib for device in reading.devices) * MIB)))
            for process in reading.processes:
                gpu_by_pid[process.pid] = gpu_by_pid.get(process.pid, 0) + round((process.memory_mib or 0.0) * MIB)
        cpu_now: dict[int, float] = {}
        with_pss = self._count % self.pss_every == 0
        self._count += 1
        for member, pid in self.members().items():
            tree = _tree(pid)
            rss, cpu_delta, workers = 0, 0.0, 0
            for process in tree:
                try:
                    rss += process.memory_info().rss
                    times = process.cpu_times()
                    total = times.user + times.system
                    cpu_now[process.pid] = total
                    cpu_delta += total - self._cpu.get(process.pid, total)
                    workers += int(process.pid != pid and self.is_worker(process))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            if not tree:
                continue
            gpu = sum(gpu_by_pid.get(process.pid, 0) for process in tree) if self.gpu is not None else None
            busy = workers > 0 or cpu_delta / elapsed > BUSY_CPU_FRACTION
            pss = _pss(tree) if with_pss or not busy else None  # idle samples always carry PSS
            self.samples.append(Sample(now, member, rss, pss, gpu, len(tree), workers, busy))
        self._cpu = cpu_now


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def _pss(tree: list[psutil.Process]) -> int | None:
    total = 0
    for process in tree:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total
