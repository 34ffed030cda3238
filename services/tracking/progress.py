"""``tracking.json`` in a run folder: what each tracker has been sent so far (the MLflow run's id,
the rounds sent, whether the artifacts went) and the run's parameters, so that a resumed run
continues the same MLflow run and a tracker that was down gets exactly what it missed.

Each tracker thread owns its own section; one lock per folder serialises the whole-file
rewrites (write-then-rename, like every file of the run folder).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from services.files import write_json_atomically

TRACKING = "tracking.json"

_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(folder: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(Path(folder).resolve(), threading.Lock())


class Progress:
    """One section of a run folder's tracking.json."""

    def __init__(self, folder: Path, section: str) -> None:
        self.path = Path(folder) / TRACKING
        self.section = section
        self._lock = _lock_for(Path(folder))

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def get(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._read().get(self.section, {}))

    def update(self, **values: Any) -> None:
        with self._lock:
            data = self._read()
            data.setdefault(self.section, {}).update(values)
            write_json_atomically(self.path, data)
