"""Which replica (identity) holds which partition, as the link settled it, on the shared data folder.

A SuperNode's node config is fixed when it starts, so a replica's node agent needs its
``partition-id`` / ``num-partitions`` before it starts ``flower-supernode``: the link writes this
map atomically (``services.files``) and every agent reads it. An identity keeps its partition
for as long as the file lives, so a restarted replica (same hostname) gets the same node config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from services.files import write_json_atomically

FILE = "appmode-assignment.json"


@dataclass(frozen=True)
class Assignment:
    num_partitions: int
    partitions: dict[str, int]  # identity -> partition id
    turned_away: tuple[str, ...] = ()  # started after the federation was settled: idle


def path(data_dir: str | Path) -> Path:
    return Path(data_dir) / FILE


def write(data_dir: str | Path, assignment: Assignment) -> None:
    write_json_atomically(path(data_dir), {"num_partitions": assignment.num_partitions, "partitions": assignment.partitions, "turned_away": list(assignment.turned_away)})


def read(data_dir: str | Path) -> Assignment | None:
    """The current map, or None before the link settled (or where the file is unreadable)."""
    try:
        raw = json.loads(path(data_dir).read_text())
        return Assignment(int(raw["num_partitions"]), {str(k): int(v) for k, v in raw["partitions"].items()}, tuple(raw.get("turned_away", ())))
    except (OSError, ValueError, KeyError, TypeError):
        return None
