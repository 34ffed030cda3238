"""The HTML of report.html besides its figures: the facts under the verdict, a table of rounds,
the replicas as rows, and who missed which round.

Readable at 100 replicas: the replicas are rows (a column per round, in a box that scrolls
sideways rather than running off the page), named as the monitor named them (compose names
such as client-3 where the names proxy is on), in natural order (client-2 before client-10).
A cell is marked by the rule the verdict uses (summary.round_failed): a replica against the
per-replica tolerance, the run as a whole against the tolerance times the replicas measured.
"""

from __future__ import annotations

import html
import re
from typing import Any

from services.monitor.rounds import Round
from services.monitor.summary import overall_tolerance_mib, round_failed

# summary.json fields about refused clients and updates; shown when the server recorded them
REFUSALS = (("updates_rejected", "updates rejected"), ("updates_clipped", "updates clipped"), ("joins_refused", "joins refused"))
LISTED = 5  # entries of a list-valued refusal shown before "and N more"


def server_replicas(rows: list[dict[str, Any]]) -> frozenset[str]:
    """The names the server's processes go by: "server", or "server-1" where the names proxy named them."""
    return frozenset(row["replica"] for row in rows if row.get("role") in ("server", "server-worker"))


def natural_key(name: str, servers: frozenset[str] = frozenset({"server"})) -> tuple:
    """The server first, then names in the order a person counts them: client-2 before client-10."""
    return (name not in servers, [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)])


def cell(value: Any, bad: bool = False) -> str:
    text = "–" if value is None else f"{value:,.1f}" if isinstance(value, float) else html.escape(str(value))
    return f'<td class="bad">{text}</td>' if bad else f"<td>{text}</td>"


def accuracy(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "–" if value is None else html.escape(str(value))


def names_by_identity(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Client identity (metrics.jsonl's id) -> the replica name the monitor gave its processes."""
    return {row["identity"]: row["replica"] for row in rows if row.get("identity") and row.get("replica")}


def partitions_by_identity(rounds: list[Round], run: dict[str, Any]) -> dict[str, Any]:
    out = {c["id"]: c.get("partition") for current in rounds for c in current.record.get("clients", []) if "id" in c}
    return {**out, **(run.get("partitions") or {})}


def refusal_facts(run: dict[str, Any]) -> list[str]:
    """One fact per refusal count the server recorded in summary.json (numbers, lists or maps)."""
    facts = []
    for field, words in REFUSALS:
        if field not in run:
            continue
        value = run[field]
        if isinstance(value, dict):
            shown = ", ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in value.items()) or "none"
        elif isinstance(value, list):
            head = ", ".join(html.escape(_entry(item)) for item in value[:LISTED])
            shown = f"{len(value)}" + (f" ({head}{f' and {len(value) - LISTED} more' if len(value) > LISTED else ''})" if value else "")
        else:
            shown = html.escape(str(value))
        facts.append(f"{words}: {shown} (summary.json {field})")
    return facts


def _entry(item: Any) -> str:
    """A listed refusal as a person reads it: a record's values joined ("intruder: not in the roster")."""
    return ": ".join(str(value) for value in item.values()) if isinstance(item, dict) else str(item)


def rounds_table(memory: dict[str, Any], rounds: list[Round], tolerance: float, slots: dict[str, Any]) -> str:
    """A row per round: what it trained and what it left behind, marked as the verdict judges."""
    by_number = {record["round"]: record for record in memory.get("rounds", [])}
    refused = any("aggregate_refused" in current.record for current in rounds)
    head = ["round", "accuracy", "clients ok", "failed", "missing", "rejected", "peak MiB", "held in all, MiB (allowed)",
            "worst replica: held MiB", "workers left", "worker processes alive at most", "holding a slot at most (slots)"]
    if refused:
        head.append("aggregate refused")
    lines = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for current in rounds:
        record, memory_round = current.record, by_number.get(current.number, {})
        measured = memory_round.get("residual_mib") is not None
        per_replica = memory_round.get("residual_per_replica_mib", {})
        worst = max(per_replica.items(), key=lambda item: item[1], default=None)
        allowed = overall_tolerance_mib(memory_round, tolerance) if measured else None
        rejected = record.get("clients_rejected", len(record.get("rejected") or []) if "rejected" in record else None)
        peak_slots = record.get("concurrent_workers_peak") or {}
        holding = ", ".join(f"{html.escape(d)} {n} ({slots.get(d, '?')})" for d, n in sorted(peak_slots.items())) or None
        cells = [
            cell(current.number),
            f"<td>{accuracy(record.get('accuracy'))}</td>",
            cell(record.get("clients_ok")),
            cell(record.get("clients_failed"), bad=bool(record.get("clients_failed"))),
            cell(len(record.get("missing") or []), bad=bool(record.get("missing"))),
            cell(rejected, bad=bool(rejected)),
            cell(memory_round.get("peak_mib")),
            cell(f"{memory_round['residual_mib']:,.1f} ({allowed:,.0f})" if measured else None, bad=measured and memory_round["residual_mib"] > allowed),
            cell(f"{worst[0]}: {worst[1]:,.1f}" if worst else None, bad=worst is not None and worst[1] > tolerance),
            cell(memory_round.get("workers_left"), bad=bool(memory_round.get("workers_left"))),
            cell(memory_round.get("max_workers_alive")),
            cell(holding),
        ]
        if refused:
            cells.append(cell(record.get("aggregate_refused"), bad=bool(record.get("aggregate_refused"))))
        verdict = "bad" if measured and round_failed(memory_round, tolerance) else "ok" if measured else ""
        lines.append(f'<tr class="{verdict}">' + "".join(cells) + "</tr>")
    return '<div class="scroll"><table class="rounds">' + "\n".join(lines) + "</table></div>"


def replicas_table(memory: dict[str, Any], tolerance: float, partitions: dict[str, Any], identities: dict[str, str], servers: frozenset[str]) -> str:
    """The replicas as rows: partition, baseline, peak, helpers, and what each round left."""
    baseline = memory.get("baseline", {}).get("per_replica_mib", {})
    info = memory.get("replicas", {})
    rounds = memory.get("rounds", [])
    names = sorted(set(baseline) | set(info) | {n for r in rounds for n in r.get("residual_per_replica_mib", {})}, key=lambda name: natural_key(name, servers))
    partition_of = {identities.get(identity, identity): partition for identity, partition in partitions.items()}
    head = ["replica", "partition", "baseline MiB", "peak MiB", "forkserver + tracker MiB"] + [f"held after round {r['round']}" for r in rounds]
    lines = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for name in names:
        entry = info.get(name, {})
        cells = [f"<th>{html.escape(name)}</th>", cell(partition_of.get(name)), cell(baseline.get(name)), cell(entry.get("peak_mib")), cell(entry.get("helpers_max_mib"))]
        for record in rounds:
            value = record.get("residual_per_replica_mib", {}).get(name)
            cells.append(cell(value, bad=value is not None and value > tolerance))
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return '<div class="scroll"><table class="replicas">' + "\n".join(lines) + "</table></div>"


def missed_table(rounds: list[Round], identities: dict[str, str]) -> str | None:
    """Who missed which round and why (not connected, failed, update rejected); None if nobody."""
    kinds = (("missing", "not connected", "reason"), ("failures", "failed", "cause"), ("rejected", "update rejected", "reason"))
    lines = []
    for current in rounds:
        for field, what, why in kinds:
            for entry in current.record.get(field) or []:
                identity = entry.get("id")
                name = identities.get(identity, identity) if identity else None
                lines.append("<tr>" + "".join([cell(current.number), cell(name), cell(entry.get("partition")), cell(what), f'<td class="text">{html.escape(str(entry.get(why, "")))}</td>']) + "</tr>")
    if not lines:
        return None
    head = "<tr><th>round</th><th>replica</th><th>partition</th><th>what</th><th>why</th></tr>"
    return '<div class="scroll"><table class="missed">' + head + "\n".join(lines) + "</table></div>"
