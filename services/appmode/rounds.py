"""An app-mode run's rounds as task mode records them (``metrics.jsonl``), from Flower's log and
the replicas' message records: what the memory sidecar, its report and the trackers read.

Flower's ServerApp keeps its rounds to itself; Bouquet sees the "[ROUND k/N]" lines its
strategies log, the ServerApp's central evaluations (``evaluations``) and every ClientApp
message its nodes served (``records``). Clients are counted as task mode counts them (nodes:
one with any failed message in the round failed, with its cause in ``failures``; one whose
reply the checks refused, rejected), the messages apart. A settled partition whose replica was
not running as the round started, and which no message of the round reached, is ``missing``
(task mode's "not connected"). Submit writes the lines of the rounds that ended while the run
goes (so the trackers and Prometheus follow it) and all of them at its end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from services.appmode import evaluations
from services.appmode.records import REFUSED
from services.files import METRICS, ROUND_STARTS, atomic_write, iso, read_json_lines
from services.server.results import concurrent_workers_peak, slots_per_device

NOT_RUNNING = "not connected: its replica was not running as the round started"


@dataclass(frozen=True)
class RoundStart:
    number: int
    at: float  # epoch seconds of Flower's "[ROUND k/N]" line
    running: frozenset[str] | None = None  # the replicas (identities) running then (services.roster); None: not known
    rounds: int | None = None  # the N of "[ROUND k/N]"


def round_starts(folder: Path) -> list[RoundStart]:
    """The rounds the ServerApp's process noted as they started (``services.appmode.serverapp``)."""
    try:
        noted = read_json_lines(folder / ROUND_STARTS)[0]
    except ValueError:
        return []
    return [RoundStart(line["round"], line["at"], frozenset(line["running"]) if line.get("running") is not None else None, line.get("rounds")) for line in noted]


def round_lines(
    starts: list[RoundStart], messages: list[dict[str, Any]], last_ended_at: float,
    central: evaluations.CentralEvaluations | None = None, holders: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One line per round: from its "[ROUND k/N]" line to the next one (the last to
    ``last_ended_at``); a ServerApp that logs no rounds is one round. ``holders``: the settled
    partitions (identity -> partition), for the partitions that missed a round."""
    if not messages and not starts:
        return []
    if not starts:
        starts = [RoundStart(1, min(record["asked_at"] for record in messages))]
    lines = []
    for index, start in enumerate(starts):
        ended = starts[index + 1].at if index + 1 < len(starts) else last_ended_at
        mine = [record for record in messages if start.at <= record.get("asked_at", 0) < ended]
        lines.append(_line(start, ended, mine, central, holders or {}))
    return lines


def _line(start: RoundStart, ended: float, mine: list[dict[str, Any]], central: evaluations.CentralEvaluations | None, holders: Mapping[str, int]) -> dict[str, Any]:
    clients = [{**record, "id": record["node"], "worker_pid": record.get("pid")} for record in mine]
    refused = [r for r in mine if r.get("outcome") == REFUSED]
    failed = {}
    for record in mine:
        if record.get("outcome") not in ("ok", REFUSED) and record["node"] not in failed:
            failed[record["node"]] = {"id": record["node"], "partition": record.get("partition"), "cause": record.get("cause"), "message_type": record.get("message_type")}
    rejected_nodes = {r["node"] for r in refused} - set(failed)
    reached = {record["node"] for record in mine}
    missing = [] if start.running is None else [
        {"id": identity, "partition": partition, "reason": NOT_RUNNING}
        for identity, partition in sorted(holders.items(), key=lambda item: item[1]) if identity not in start.running and identity not in reached
    ]
    return {
        "round": start.number, "started_at": iso(start.at), "ended_at": iso(ended), "round_seconds": round(ended - start.at, 3),
        "clients_ok": len(reached - set(failed) - rejected_nodes), "clients_failed": len(failed),
        "clients_rejected": len(rejected_nodes),  # a reply refused by the checks (as task mode: neither ok nor failed)
        "failures": list(failed.values()), "missing": missing,
        "rejected": [{"id": r["node"], "partition": r.get("partition"), "message_type": r.get("message_type"), "reason": r.get("reason")} for r in refused],
        "messages_ok": sum(1 for r in mine if r.get("outcome") == "ok"), "messages_rejected": len(refused),
        "messages_failed": sum(1 for r in mine if r.get("outcome") not in ("ok", REFUSED)),
        "trained": any(r.get("message_type") == "train" and r.get("outcome") == "ok" for r in mine),
        "num_partitions": max((r["num_partitions"] for r in mine if r.get("num_partitions")), default=None),
        "clients": clients, "slots_per_device": slots_per_device(clients), "concurrent_workers_peak": concurrent_workers_peak(clients),
        **(central.by_round.get(start.number, {}) if central is not None else {}),  # the ServerApp's accuracy and loss, when it logged them
    }


def write_rounds(folder: Path, lines: list[dict[str, Any]]) -> None:
    """``metrics.jsonl``, replaced whole (the lines of a live run grow; a reader never sees half
    of them). At the end it is written before summary.json: the sidecar stops when that appears."""
    with atomic_write(folder / METRICS) as out:
        out.writelines(json.dumps(line, sort_keys=True) + "\n" for line in lines)


def rounds_completed(lines: list[dict[str, Any]]) -> int:
    """Rounds in which at least one client trained (a train message ok), as task mode counts them."""
    return sum(1 for line in lines if line["trained"])
