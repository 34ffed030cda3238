"""Finding the run folder to record, and holding it: a named one, or, without a run id, the run
that starts (or resumes) around the monitor. Compose starts the monitor beside a server whose
run id is generated, either may create its files first, and a resumed run's folder is an old
one that comes back to life; a lock file says which folder a live monitor is recording."""

from __future__ import annotations

import time
from pathlib import Path

from services.locks import HeldLock, is_held

RECENT_S = 60.0  # a run folder created (or resumed) this long before the monitor started still counts
LOCK_NAME = ".monitor.lock"


def recording_lock(run_path: Path) -> HeldLock:
    """Held by the monitor recording the run, for as long as it records it; a new monitor can
    take over once that one is gone, however it went."""
    return HeldLock(Path(run_path) / LOCK_NAME)


def running_runs(results_dir: Path, since: float) -> list[Path]:
    """Run folders still running (no summary.json), recorded by no live monitor, and created
    or brought back (a resume rewrites files at the folder's top level) after ``since``;
    newest first."""
    try:
        entries = [entry for entry in results_dir.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    except FileNotFoundError:
        return []
    candidates = []
    for entry in entries:
        try:
            changed = entry.stat().st_mtime
        except FileNotFoundError:
            continue
        if changed >= since and not (entry / "summary.json").exists() and not is_held(entry / LOCK_NAME):
            candidates.append((changed, entry))
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
