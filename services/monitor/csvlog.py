"""memory.csv: one row per device and per process at every sample.

Rows reach the operating system after every sample and the disk at least once a second, so a
crash of the monitor or the machine loses at most about a second of samples.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from services.files import atomic_write
from services.files import epoch
from services.monitor.rounds import Round, label

COLUMNS = [
    "time",  # ISO 8601 UTC, milliseconds
    "elapsed_s",  # seconds since the monitor's first sample
    "sample",  # sample number; the rows of one sample share it
    "round",  # round the sample belongs to (0 = before round 1); see "phase"
    "phase",  # setup | round | between | after; empty while not yet known
    "kind",  # device | process
    "device",  # GPU index, or "host" for host memory
    "pid",  # host pid (process rows)
    "ppid",
    "started",  # when the process was created (ISO 8601 UTC)
    "role",  # client | server | worker | server-worker | helper | monitor | other
    "replica",  # client identity / compose service-number / "server" / "host"
    "identity",  # the client id the server records in metrics.jsonl
    "container",  # short container id, empty on the host
    "memory_mib",  # device: used; process: its GPU memory (nvml) or PSS (host; RSS where unreadable)
    "total_mib",  # device rows: capacity
    "utilization_pct",  # device rows: GPU utilisation (nvml only)
    "source",  # nvml | host
]
FLOATS = ("elapsed_s", "memory_mib", "total_mib", "utilization_pct")
INTS = ("sample", "round", "pid", "ppid")
SYNC_EVERY_S = 1.0


@dataclass(frozen=True)
class Continuation:
    """Where an earlier monitor of the same run stopped: the next sample number, and the time
    elapsed_s counts from (the first sample's)."""

    next_sample: int
    first_t: float


class MemoryCsv:
    def __init__(self, path: Path) -> None:
        """A new file, or the end of the one an earlier monitor of this run left (a resumed run,
        or a monitor that was restarted): a row cut by that monitor's death is dropped and the
        samples go on from where it stopped (``continuation``)."""
        self.path = Path(path)
        self.continuation = _continue(self.path)
        self._file = open(self.path, "a" if self.continuation else "x", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS, extrasaction="raise")
        if self.continuation is None:
            self._writer.writeheader()
        self._synced = time.monotonic()
        self.rows_written = 0

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self._writer.writerow({key: _format(row.get(key)) for key in COLUMNS})
            self.rows_written += 1
        self._file.flush()
        if time.monotonic() - self._synced >= SYNC_EVERY_S:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def _continue(path: Path) -> Continuation | None:
    """Cut a partial last row, then read the first row's time and the last row's sample number
    (the first and last lines only: the file may be large). None when there is nothing to
    continue (no file, or an empty one)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        path.unlink()
        return None
    with open(path, "r+b") as existing:
        head = existing.read(64 * 1024).split(b"\n")
        existing.seek(max(0, size - 64 * 1024))
        tail = existing.read()
        complete = tail[: tail.rfind(b"\n") + 1]
        if len(complete) != len(tail):
            existing.truncate(size - (len(tail) - len(complete)))
    header = head[0].decode()
    first = next(csv.DictReader([header, head[1].decode()]), None) if len(head) > 2 else None
    if first is None:  # the header only
        return Continuation(0, time.time())
    last_line = complete.rstrip(b"\n").rsplit(b"\n", 1)[-1].decode()
    last = next(csv.DictReader([header, last_line]))
    return Continuation(int(last["sample"]) + 1, epoch(first["time"]))


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """memory.csv back as typed rows: numbers as numbers, empty cells as None, plus "t" and
    "started_t" (seconds since the epoch) for arithmetic on times."""
    rows = []
    with open(path, newline="") as source:
        for raw in csv.DictReader(source):
            row: dict[str, Any] = {key: (value if value != "" else None) for key, value in raw.items()}
            for key in FLOATS:
                row[key] = float(row[key]) if row[key] is not None else None
            for key in INTS:
                row[key] = int(row[key]) if row[key] is not None else None
            row["t"] = epoch(row["time"])
            row["started_t"] = epoch(row["started"]) if row["started"] else None
            rows.append(row)
    return rows


def relabel(path: Path, rounds: list[Round]) -> int:
    """Give every row its final round and phase once all round times are known (atomic rewrite)."""
    count = 0
    with open(path, newline="") as source, atomic_write(path, "w", newline="") as target:
        writer = csv.DictWriter(target, fieldnames=COLUMNS)
        writer.writeheader()
        for row in csv.DictReader(source):
            number, phase = label(rounds, epoch(row["time"]), final=True)
            row["round"], row["phase"] = ("" if number is None else str(number)), phase
            writer.writerow(row)
            count += 1
    return count
