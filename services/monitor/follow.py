"""Finding the run folder to record: a named one, or, without a run id, the run that starts
around the monitor (compose starts the monitor beside a server whose run id is generated, and
either may create its files first)."""

from __future__ import annotations

import time
from pathlib import Path

RECENT_S = 60.0  # a run folder created this long before the monitor started still counts as new


def running_runs(results_dir: Path, since: float) -> list[Path]:
    """Run folders still running (no summary.json), not yet recorded (no memory.csv), and
    created after ``since``; newest first."""
    try:
        entries = [entry for entry in results_dir.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    except FileNotFoundError:
        return []
    candidates = []
    for entry in entries:
        try:
            created = entry.stat().st_mtime  # while a run goes on nothing new appears at its top level
        except FileNotFoundError:
            continue
        if created >= since and not (entry / "summary.json").exists() and not (entry / "memory.csv").exists():
            candidates.append((created, entry))
    return [entry for _, entry in sorted(candidates, reverse=True)]


def wait_for_run_folder(results_dir: Path, run_id: str | None, timeout: float, stop=None, poll_s: float = 0.2) -> Path | None:
    """The run folder once it exists, or None after ``timeout`` seconds (or when ``stop`` is set)."""
    since = time.time() - RECENT_S
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        if run_id is not None:
            if (results_dir / run_id).is_dir():
                return results_dir / run_id
        else:
            found = running_runs(results_dir, since)
            if found:
                return found[0]
        time.sleep(poll_s)
    return None
