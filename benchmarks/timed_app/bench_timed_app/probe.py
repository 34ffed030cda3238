"""One JSON line per event to the run config's ``timings-file``: what every configuration of
benchmarks/appmode.py reads the same way. Appends of one short line are whole (O_APPEND)."""

from __future__ import annotations

import json
import os
import time
from typing import Any


def process_age_seconds() -> float:
    """Seconds since this process was created (forked or exec'ed), from the kernel's own clock
    (/proc/uptime and the process's start tick: both since boot, so no wall-clock rounding)."""
    with open("/proc/uptime") as uptime:
        now = float(uptime.read().split()[0])
    with open(f"/proc/{os.getpid()}/stat") as stat:
        started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
    return now - started_ticks / os.sysconf("SC_CLK_TCK")


def record(path: str, **fields: Any) -> None:
    if not path:
        return  # the app run by hand: no probes
    line = json.dumps({"at": time.time(), "pid": os.getpid(), **fields}, sort_keys=True) + "\n"
    with open(path, "a") as out:
        out.write(line)
