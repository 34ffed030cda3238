"""Sample the memory of each federation member's process tree (the member plus everything it
started: workers, a forkserver, ClientApp processes) while a benchmark run goes on.

The benchmark needs per-member numbers for the Deployment Engine too, whose processes the
memory monitor (services.monitor) does not know, so it samples by itself: every ``interval``
seconds, host RSS of each tree (cheap; pages shared between processes, e.g. a forkserver's
torch and its forked workers, count once per process, as ``ps`` shows them), every
``pss_every``-th sample and every idle one its PSS (shared pages split among their sharers: what the tree really
costs the host, but reading smaps costs ~4 ms per process), and, when NVML sees a GPU, the
device memory used by the tree's processes. A tree is *busy* in a sample when it has a worker
process or used more than a tenth of a core since the previous sample; otherwise *idle*.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import psutil

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


class Gpu:
    """NVML, if a GPU and the library are there; otherwise ``available`` is False."""

    def __init__(self) -> None:
        self.available = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.available = bool(self._handles)
            self.name = pynvml.nvmlDeviceGetName(self._handles[0]) if self._handles else None
        except Exception:  # no driver, no library or no device: a CPU machine
            self._handles = []
            self.name = None

    def used_by_pid(self) -> dict[int, int]:
        used: dict[int, int] = {}
        for handle in self._handles:
            for process in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used[process.pid] = used.get(process.pid, 0) + (process.usedGpuMemory or 0)
        return used

    def device_used(self) -> int:
        return sum(self._nvml.nvmlDeviceGetMemoryInfo(handle).used for handle in self._handles)


class TreeSampler:
    """Background thread; ``members()`` returns {member name: root pid} at each sample, so
    members that start late (clients, SuperNodes) are picked up as they appear."""

    def __init__(self, members: Callable[[], dict[str, int]], interval: float = 0.25, pss_every: int = 4, is_worker: Callable[[psutil.Process], bool] | None = None) -> None:
        self.members = members
        self.interval = interval
        self.pss_every = pss_every
        self._count = 0
        self.is_worker = is_worker or (lambda process: False)
        self.samples: list[Sample] = []
        self.device_used: list[tuple[float, int]] = []
        self.gpu = Gpu()
        self._cpu: dict[int, float] = {}
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception:  # a member list that cannot be read right now; try again next time
                continue

    def _sample(self) -> None:
        now, tick = time.time(), time.monotonic()
        elapsed, self._last = max(tick - self._last, 1e-3), tick
        gpu_by_pid = self.gpu.used_by_pid() if self.gpu.available else {}
        if self.gpu.available:
            self.device_used.append((now, self.gpu.device_used()))
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
            gpu = sum(gpu_by_pid.get(process.pid, 0) for process in tree) if self.gpu.available else None
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
