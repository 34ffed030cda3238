"""Finding the run folder to record, and holding it: a named one, or, without a run id, the run
that starts (or resumes) around the monitor. Compose starts the monitor beside a server whose
run id is generated, either may create its files first, and a resumed run's folder is an old
one that comes back to life; a lock file says which folder a live monitor is recording."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

RECENT_S = 60.0  # a run folder created (or resumed) this long before the monitor started still counts
LOCK_NAME = ".monitor.lock"


class RecordingLock:
    """An exclusive flock on <run>/.monitor.lock for as long as this monitor records the run; the
    kernel drops it when the monitor dies, however it dies, so a new monitor can take over."""

    def __init__(self, run_path: Path) -> None:
        self.path = Path(run_path) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def is_recorded(run_path: Path) -> bool:
    """Whether a live monitor holds this run's lock right now."""
    try:
        fd = os.open(Path(run_path) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


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
        if changed >= since and not (entry / "summary.json").exists() and not is_recorded(entry):
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
