"""Which partitions missed a round, and why: one definition for summary.json's
rounds_missed_by_partition (task mode's server, app mode's submit) and report.html's table of
misses (the monitor).

Pure and Flower-free, below both roles, so neither imports the other. A partition missed a round
when its holder was not connected as the round was sampled (``missing``), its job failed
(``failures``), its update was refused (``rejected``), or the round's aggregate was refused
(``aggregate_refused``: every client that trained in it trained for nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# reason -> how a person reads it
REASONS = {"not_connected": "not connected", "failed": "failed", "rejected": "update rejected", "aggregate_refused": "aggregate refused"}


@dataclass(frozen=True)
class Miss:
    partition: int
    identity: str | None
    reason: str  # a key of REASONS
    why: str  # the record's own words


def misses(record: Mapping[str, Any]) -> list[Miss]:
    """Every (partition, reason) by which a partition missed this round, in the record's order."""
    out = []
    for field, reason, words in (("missing", "not_connected", "reason"), ("failures", "failed", "cause"), ("rejected", "rejected", "reason")):
        for entry in record.get(field) or []:
            if entry.get("partition") is not None:
                out.append(Miss(entry["partition"], entry.get("id"), reason, str(entry.get(words, ""))))
    if "aggregate_refused" in record:
        for client in record.get("clients") or []:
            if client.get("partition") is not None:
                out.append(Miss(client["partition"], client.get("id"), "aggregate_refused", str(record["aggregate_refused"])))
    return out


def trained(record: Mapping[str, Any]) -> list[int]:
    """The partitions whose training became part of the model this round (none when the round's aggregate was refused)."""
    if not record.get("trained"):
        return []
    return [client["partition"] for client in record.get("clients") or [] if client.get("partition") is not None]


def by_partition(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """summary.json's rounds_missed_by_partition from the rounds' records: per partition, the
    rounds it missed and how many for each reason. A partition missed a round at most once,
    whatever the reasons; one never sampled missed nothing. Partitions that missed nothing are
    left out, so an empty dict says every partition trained when asked."""
    out: dict[str, dict[str, int]] = {}
    for record in records:
        missed: dict[str, set[str]] = {}
        for miss in misses(record):
            missed.setdefault(str(miss.partition), set()).add(miss.reason)
        for partition, why in missed.items():
            counts = out.setdefault(partition, {"missed": 0})
            counts["missed"] += 1
            for reason in (reason for reason in REASONS if reason in why):
                counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(out.items(), key=lambda item: int(item[0])))
