"""Build a file or folder once per host, however many processes ask for it at the same time.

Many clients (and their workers) share one data dir. The first to arrive builds the entry
under an exclusive file lock into a temporary name and renames it into place; the others
wait on the lock and then find it ready. A crash mid-build leaves only the temporary name,
so a half-written entry is never read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from services.files import replaced_atomically
from services.locks import exclusively


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, calling ``build(temporary_path)`` first if it does not exist yet."""
    target = Path(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusively(target.with_name(f".{target.name}.lock")):
        if target.exists():
            return target
        with replaced_atomically(target, unique=True) as scratch:
            build(scratch)
    return target

