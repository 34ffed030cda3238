"""The file mechanics every part of Bouquet shares (both modes' servers, the clients, the
monitor, the trackers, the launcher, the build-once cache, the need book, the benchmarks), so
that each is written once:

- the names of a run folder's files that several parts read (``METRICS``; app mode's
  ``SERVERAPP_FOLDER``, ``MESSAGES``, ``REPLY_CHECKS``, ``FLWR_RUN_LOG``) and its time stamps
  (``iso``, ``epoch``);
- writing so a reader sees the old entry or the whole new one, never half of it:
  ``replaced_atomically`` (a file or folder built beside its target, then renamed),
  ``atomic_write`` (a file, fsynced before the rename), ``write_json_atomically`` (JSON through
  ``json_safe``: NaN and infinity as null, bytes as hex);
- reading: ``read_json_lines`` (the complete lines of a JSON-lines file from an offset on; a
  line still being written, or cut by a crash, is not read), ``read_rounds`` (a run's
  ``metrics.jsonl``), ``tail`` (the end of a log, for error messages), ``files_under``.

Standard library only (the monitor image imports this module too).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

METRICS = "metrics.jsonl"  # in a run folder: one JSON line per finished round, appended by the server
SERVERAPP_FOLDER = "serverapp"  # in an app-mode run folder: the ServerApp's working folder, what it saved
MESSAGES = "messages.jsonl"  # in an app-mode run folder: one JSON line per ClientApp message
REPLY_CHECKS = "reply-checks.jsonl"  # in an app-mode run folder: the ServerApp process's refused (and clipped) ClientApp replies, and those it stopped waiting for
JOINS_REFUSED = ".appmode-joins-refused.jsonl"  # in the results folder: SuperNodes the app-mode front refused, one line per node, as the link saw them
ROUND_STARTS = "round-starts.jsonl"  # in an app-mode run folder: when the ServerApp started each round, and which replicas ran then
FLWR_RUN_LOG = "flwr-run.log"  # in an app-mode run folder: what `flwr run --stream` printed


def iso(seconds: float) -> str:
    """A moment as the run folder's files write it: UTC, ISO 8601, milliseconds."""
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat(timespec="milliseconds")


def epoch(iso_text: str) -> float:
    """The moment a run folder's ISO time stamp names, in epoch seconds."""
    return dt.datetime.fromisoformat(iso_text).timestamp()


def files_under(folder: Path) -> list[Path]:
    """Every file below ``folder``, sorted (none when it is not a folder)."""
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else []


def scratch_path(target: Path, unique: bool = False) -> Path:
    """The hidden name beside ``target`` that a new version is built under (``.<name>.partial``;
    with ``unique``, one per process, for targets that several processes may build at once)."""
    target = Path(target)
    middle = f".{os.getpid()}" if unique else ""
    return target.with_name(f".{target.name}{middle}.partial")


@contextmanager
def replaced_atomically(target: Path, unique: bool = False) -> Iterator[Path]:
    """Yield a scratch path; when the block ends normally, rename what was built there onto
    ``target`` (a file or a folder) in one step. Whatever is left at the scratch path, from this
    attempt or a crashed one, is removed."""
    scratch = scratch_path(target, unique)
    _remove(scratch)
    try:
        yield scratch
        os.replace(scratch, target)
    finally:
        _remove(scratch)


@contextmanager
def atomic_write(target: Path, mode: str = "w", **open_args: Any) -> Iterator[IO[Any]]:
    """``open(target, mode)`` that replaces ``target`` only once everything is written and fsynced:
    a crash mid-write leaves the previous version (or nothing), never a half-written file."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_write writes a whole new file; mode {mode!r} is not a write mode")
    with replaced_atomically(Path(target)) as scratch:
        with open(scratch, mode, **open_args) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinity as None (JSON has neither), numpy scalars as Python's and
    bytes (a Flower metric may be bytes) as hex text, so no client's metric can break a record."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:  # a numpy scalar (numpy not imported here)
        return json_safe(value.item())
    return value


def write_json_atomically(target: Path, payload: Any) -> None:
    """``payload`` as indented, key-sorted JSON, atomically (see ``atomic_write``)."""
    with atomic_write(target) as out:
        json.dump(json_safe(payload), out, indent=2, sort_keys=True)
        out.write("\n")


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a (log) file, or "(no log)" when it cannot be read."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def append_json_line(path: Path, payload: dict[str, Any]) -> None:
    """One JSON line appended whole (one write: lines of concurrent writers never interleave)."""
    with open(path, "a") as out:
        out.write(json.dumps(payload, sort_keys=True) + "\n")


def read_json_lines(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The objects on the complete lines of ``path`` from byte ``offset`` on, and the offset after
    the last of them (to read only what was appended since). No file: nothing yet."""
    try:
        with open(path, "rb") as lines:
            lines.seek(offset)
            chunk = lines.read()
    except FileNotFoundError:
        return [], offset
    complete = chunk[: chunk.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.decode().splitlines() if line.strip()], offset + len(complete)


def read_rounds(run_path: Path) -> list[dict[str, Any]]:
    """A run folder's metrics.jsonl: one record per finished round."""
    return read_json_lines(Path(run_path) / METRICS)[0]


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    elif entry.exists() or entry.is_symlink():
        entry.unlink()
