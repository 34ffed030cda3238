"""Host memory when there is no GPU: the PSS of each of the run's processes (psutil).

CPU runs then show the same picture as GPU runs: workers appear and vanish each round while
the long-lived client processes stay flat. The device row ("host") is the sum over the run's
processes, so that the summary's overall figure means the same thing as on a GPU: memory the
run holds, not what everything else on the machine does.

Why PSS and not RSS: forked workers share their forkserver's pages (copy-on-write) and every
process maps the same libraries, so a sum of RSS counts those pages once per process and
exceeds what the host really uses. PSS (proportional set size, /proc/<pid>/smaps_rollup)
charges a shared page to its sharers in equal parts, so the sum over processes counts it once.

Reading smaps_rollup walks a process's page tables: ~3-7 ms for a process that imported torch
(forkserver, worker) against ~0.03 ms for statm's RSS. So a process's PSS is read when it is
first seen (always), then again once it is PSS_MAX_AGE_S old, oldest first, while a quarter of
the sampling interval lasts; in between it carries its last PSS forward, moved by how much its
RSS (cheap, read every sample) changed since, so memory a process allocates or frees shows at
once and only a change in how pages are shared waits for the next read. A process whose PSS
cannot be read (another user's process without CAP_SYS_PTRACE) is counted by its RSS; how many
readings were which is reported in memory_summary.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil

from services.monitor.processes import ProcessTable
from services.monitor.readings import MIB, DeviceReading, ProcessReading, Reading

log = logging.getLogger("bouquet.monitor")

PSS_BUDGET_SHARE = 0.25  # of the sampling interval, spent at most on reading known processes' PSS again
PSS_MAX_AGE_S = 1.0  # a known process's PSS is read again once it is this old


@dataclass
class _Pss:
    pss: int  # bytes, at the last smaps_rollup read
    rss: int  # RSS at that read: later RSS changes move the carried PSS
    read_at: float


class HostReader:
    source = "host"

    def __init__(
        self,
        table: ProcessTable,
        interval: float = 0.2,
        process: Callable[[int], Any] = psutil.Process,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.table = table
        self.total_mib = psutil.virtual_memory().total / MIB
        self.budget_s = PSS_BUDGET_SHARE * interval
        self._process = process
        self._clock = clock
        self._known: dict[tuple[int, float | None], _Pss] = {}
        self._unreadable: set[tuple[int, float | None]] = set()
        self.counts = {"pss_read": 0, "pss_carried": 0, "rss": 0}
        self.rss_because: str | None = None
        self.name = _device_name(by_pss=0, by_rss=0)

    def read(self) -> Reading:
        keys = {pid: (pid, self.table.describe(pid).started) for pid in self.table.tracked()}
        self._forget(set(keys.values()))
        spent, processes, by_rss = 0.0, [], 0
        for pid in self._priority(keys):
            key = keys[pid]
            refresh = self._refresh(key, spent)
            began = self._clock()
            try:
                memory, measure = self._measure(pid, key, refresh)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue  # exited between the listing and now: it holds nothing
            finally:
                if refresh:
                    spent += self._clock() - began
            self.counts[measure] += 1
            by_rss += measure == "rss"
            processes.append(ProcessReading(pid, "host", memory / MIB))
        used = sum(p.memory_mib for p in processes if p.memory_mib is not None)
        self.name = _device_name(by_pss=len(processes) - by_rss, by_rss=by_rss)
        return Reading([DeviceReading("host", self.name, used, self.total_mib)], sorted(processes, key=lambda p: p.pid))

    def facts(self) -> dict[str, Any]:
        """For memory_summary.json: which measure the host numbers are."""
        by_pss, by_rss = self.counts["pss_read"] + self.counts["pss_carried"], self.counts["rss"]
        measure = "pss+rss" if by_pss and by_rss else "rss" if by_rss else "pss"
        return {
            "devices": [{"index": "host", "name": self.name}],
            "host_memory": {
                "measure": measure,
                "readings": dict(self.counts),
                "rss_because": self.rss_because,
                "pss_budget_ms": round(1000 * self.budget_s, 1),
                "pss_max_age_s": PSS_MAX_AGE_S,
            },
        }

    def close(self) -> None:
        pass

    # -- internals -----------------------------------------------------------------------------

    def _priority(self, keys: dict[int, tuple[int, float | None]]) -> list[int]:
        """Processes never read first (their RSS would count shared pages again), then the
        ones whose PSS is oldest."""
        return sorted(keys, key=lambda pid: self._known[keys[pid]].read_at if keys[pid] in self._known else float("-inf"))

    def _refresh(self, key: tuple[int, float | None], spent: float) -> bool:
        """Read this process's PSS now? Always when never read; when read before, once it is
        PSS_MAX_AGE_S old and while this sample's budget lasts; never when it was refused."""
        if key in self._unreadable:
            return False
        if key not in self._known:
            return True
        return spent < self.budget_s and self._clock() - self._known[key].read_at >= PSS_MAX_AGE_S

    def _measure(self, pid: int, key: tuple[int, float | None], refresh: bool) -> tuple[int, str]:
        """(bytes, "pss_read" | "pss_carried" | "rss") for one process."""
        process = self._process(pid)
        if refresh:
            try:
                full = process.memory_full_info()
            except psutil.AccessDenied as error:  # a process that exited raises NoSuchProcess instead
                self._deny(pid, key, error)
            else:
                self._known[key] = _Pss(full.pss, full.rss, self._clock())
                return full.pss, "pss_read"
        rss = process.memory_info().rss
        known = self._known.get(key)
        if known is None:
            return rss, "rss"
        return max(0, known.pss + rss - known.rss), "pss_carried"

    def _deny(self, pid: int, key: tuple[int, float | None], error: Exception) -> None:
        """Counted by RSS from now on; said once per run, since its cause is the same for all."""
        self._unreadable.add(key)
        if self.rss_because is None:
            self.rss_because = (
                f"PSS of pid {pid} unreadable ({type(error).__name__}): /proc/<pid>/smaps_rollup of another user's "
                "process needs CAP_SYS_PTRACE (in compose: cap_add: [SYS_PTRACE] on gpu-monitor)"
            )
            log.warning("%s; counting such processes by their RSS", self.rss_because)

    def _forget(self, alive: set[tuple[int, float | None]]) -> None:
        for key in set(self._known) - alive:
            del self._known[key]
        self._unreadable &= alive


def _device_name(by_pss: int, by_rss: int) -> str:
    """The device row's name says what its sum is of."""
    if by_rss and not by_pss:
        return "host memory (RSS of the run's processes)"
    if by_rss:
        return f"host memory (PSS of the run's processes; RSS for {by_rss} whose PSS is unreadable)"
    return "host memory (PSS of the run's processes)"
