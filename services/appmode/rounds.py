"""An app-mode run's rounds as task mode records them (``metrics.jsonl``), from Flower's log and
the replicas' message records: what the memory sidecar, its report and the trackers read.

Flower's ServerApp keeps its rounds to itself; Bouquet sees the "[ROUND k/N]" lines its
strategies log, the ServerApp's central evaluations (``evaluations``) and every ClientApp
message its nodes served (``records``). Clients are counted as task mode counts them (nodes:
one with any failed message in the round failed; one whose reply the checks refused, rejected),
the messages apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.appmode import evaluations
from services.appmode.records import REFUSED
from services.files import METRICS, atomic_write, iso
from services.server.results import concurrent_workers_peak, slots_per_device


def write_rounds(
    folder: Path, starts: list[tuple[int, float]], messages: list[dict[str, Any]], ended_at: float,
    central: evaluations.CentralEvaluations | None = None,
) -> list[dict[str, Any]]:
    """Write ``metrics.jsonl`` (one line per round, its messages as ``clients``) and return its
    lines. A round runs from Flower's "[ROUND k/N]" line to the next one (the last to the end of
    the run); a ServerApp that logs no rounds is one round. Written before summary.json: the
    sidecar stops when that appears."""
    if not messages:
        return []
    if not starts:
        starts = [(1, min(record["asked_at"] for record in messages))]
    lines = []
    for index, (number, started) in enumerate(starts):
        ended = starts[index + 1][1] if index + 1 < len(starts) else max([ended_at, *(r.get("ended_at", 0) for r in messages)])
        mine = [record for record in messages if started <= record.get("asked_at", 0) < ended]
        clients = [{**record, "id": record["node"], "worker_pid": record.get("pid")} for record in mine]
        refused = [r for r in mine if r.get("outcome") == REFUSED]
        failed_nodes = {r["node"] for r in mine if r.get("outcome") not in ("ok", REFUSED)}
        rejected_nodes = {r["node"] for r in refused} - failed_nodes
        lines.append({
            "round": number, "started_at": iso(started), "ended_at": iso(ended), "round_seconds": round(ended - started, 3),
            "clients_ok": len({r["node"] for r in mine} - failed_nodes - rejected_nodes), "clients_failed": len(failed_nodes),
            "clients_rejected": len(rejected_nodes),  # a reply refused by the checks (as task mode: neither ok nor failed)
            "rejected": [{"id": r["node"], "partition": r.get("partition"), "message_type": r.get("message_type"), "reason": r.get("reason")} for r in refused],
            "messages_ok": sum(1 for r in mine if r.get("outcome") == "ok"), "messages_rejected": len(refused),
            "messages_failed": sum(1 for r in mine if r.get("outcome") not in ("ok", REFUSED)),
            "trained": any(r.get("message_type") == "train" and r.get("outcome") == "ok" for r in mine),
            "num_partitions": max((r["num_partitions"] for r in mine if r.get("num_partitions")), default=None),
            "clients": clients, "slots_per_device": slots_per_device(clients), "concurrent_workers_peak": concurrent_workers_peak(clients),
            **(central.by_round.get(number, {}) if central is not None else {}),  # the ServerApp's accuracy and loss, when it logged them
        })
    with atomic_write(folder / METRICS) as out:
        out.writelines(json.dumps(line, sort_keys=True) + "\n" for line in lines)
    return lines


def rounds_completed(lines: list[dict[str, Any]]) -> int:
    """Rounds in which at least one client trained (a train message ok), as task mode counts them."""
    return sum(1 for line in lines if line["trained"])
