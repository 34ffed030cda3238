"""Sampling at a fixed interval in a background thread (like nvitop's collector), so the main
thread stays free to follow the run and to stop cleanly. ``Periodic`` is that loop, shared by
the monitor's ``Sampler`` (each sample becomes rows of memory.csv: one per device and one per
process, attributed to replica and round) and the benchmark's per-member ``TreeSampler``
(benchmarks/trees.py)."""

from __future__ import annotations

import abc
import logging
import threading
import time
from typing import Any, Callable

from services.monitor.processes import ProcessTable
from services.monitor.readings import MemoryReader
from services.files import iso
from services.monitor.rounds import RoundLog, label

log = logging.getLogger("bouquet.monitor")


class Periodic(abc.ABC):
    """Calls ``sample_once()`` every ``interval`` seconds, the first time at once, until
    ``stop()`` (or the end of a ``with`` block). A sample that fails (a driver hiccup, a process
    list read mid-change) is counted and reported once per message, and the recording goes on;
    a sample that overran the interval makes the loop skip ahead instead of bursting."""

    thread_name = "memory-sampler"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.busy_s = 0.0  # time spent sampling: the sampler's own overhead
        self.max_busy_s = 0.0
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: set[str] = set()

    @abc.abstractmethod
    def sample_once(self) -> Any:
        """Take one sample (the loop calls it; tests call it directly)."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Periodic":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.sample_once()
            except Exception as error:  # one bad sample must not end the recording
                self.errors += 1
                message = f"{type(error).__name__}: {error}"
                if message not in self._reported:
                    self._reported.add(message)
                    log.warning("sample failed (reported once): %s", message)
            busy = time.monotonic() - began
            self.busy_s += busy
            self.max_busy_s = max(self.max_busy_s, busy)
            next_at += self.interval
            if next_at < time.monotonic():  # fell behind: skip ahead instead of bursting
                next_at = time.monotonic()
            self._stop.wait(max(0.0, next_at - time.monotonic()))


class Sampler(Periodic):
    """The monitor's: every sample, the process table, one reading and the round it falls in."""

    def __init__(
        self,
        reader: MemoryReader,
        table: ProcessTable,
        rounds: RoundLog,
        write: Callable[[list[dict[str, Any]]], None],
        interval: float,
        clock: Callable[[], float] = time.time,
        first_sample: int = 0,
        first_t: float | None = None,
    ) -> None:
        """``first_sample`` and ``first_t`` continue an earlier monitor's numbering and clock."""
        super().__init__(interval)
        self.reader, self.table, self.rounds, self.write = reader, table, rounds, write
        self.clock = clock
        self.samples = 0  # taken by this monitor
        self.first_sample = first_sample
        self.first_t: float | None = first_t
        self.last_t: float | None = None

    def sample_once(self) -> list[dict[str, Any]]:
        when = self.clock()
        self.table.refresh()
        reading = self.reader.read()
        known = self.rounds.refresh()
        number, phase = label(known, when, final=False)
        if self.first_t is None:
            self.first_t = when
        common = {
            "time": iso(when),
            "elapsed_s": when - self.first_t,
            "sample": self.first_sample + self.samples,
            "round": number,
            "phase": phase,
            "source": self.reader.source,
        }
        rows = [
            {**common, "kind": "device", "device": d.index, "memory_mib": d.used_mib, "total_mib": d.total_mib, "utilization_pct": d.utilization_pct}
            for d in reading.devices
        ]
        for process in reading.processes:
            who = self.table.describe(process.pid)
            rows.append(
                {
                    **common,
                    "kind": "process",
                    "device": process.device,
                    "pid": process.pid,
                    "ppid": who.ppid,
                    "started": iso(who.started) if who.started else None,
                    "role": who.role,
                    "replica": who.replica,
                    "identity": who.identity,
                    "container": who.container,
                    "memory_mib": process.memory_mib,
                }
            )
        self.write(rows)
        self.samples += 1
        self.last_t = when
        return rows
