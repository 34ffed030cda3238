"""report.html: one self-contained page (PNGs embedded) that shows a person at a glance
whether memory went back to baseline after every round, at 3 replicas or at 100.

The monitor writes it into the run folder at the end of every run, after memory_summary.json
(so compose users get it without the host's Python environment); ``python -m
services.monitor.report <run folder>`` (or scripts/report.py) draws it again for any run
folder, e.g. one whose monitor was killed.

It needs the run's metrics.jsonl and the monitor's memory.csv; memory_summary.json is used when
present (else it is computed here). Sections: the one-line verdict and the facts behind it
(what the helpers hold, workers alive against the slots, refusals); memory over time; workers
per device; accuracy and loss; round time; a row per round; who missed which round; the
replicas as rows (services.monitor.figures draws, services.monitor.tables writes the tables).
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path
from typing import Any

from services.admission.records import workers_alive
from services.files import METRICS, atomic_write
from services.monitor.csvlog import read_rows
from services.monitor.figures import measure, memory_figure, quality_figure, round_time_figure, workers_figure
from services.monitor.rounds import Round, RoundLog, clients_of, settled_slots
from services.monitor.summary import samples_of, summarize
from services.monitor.tables import (
    accuracy, missed_table, names_by_identity, partitions_by_identity, refusal_facts, replicas_table, rounds_table, server_replicas,
)

DEFAULT_TOLERANCE_MIB = 64.0
PROGRAM = "services.monitor.report"


class ReportError(RuntimeError):
    """The folder lacks what a report needs; the message says what."""


def load(run_path: Path, tolerance_mib: float = DEFAULT_TOLERANCE_MIB, rows: list[dict[str, Any]] | None = None) -> tuple[list[Round], list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    if not (run_path / METRICS).is_file():
        raise ReportError(f"{run_path} has no metrics.jsonl: is it a Bouquet run folder?")
    if not (run_path / "memory.csv").is_file():
        raise ReportError(f"{run_path} has no memory.csv: run with --monitor (or python -m services.monitor) to record memory")
    rounds = RoundLog(run_path / METRICS).refresh()
    rows = read_rows(run_path / "memory.csv") if rows is None else rows
    summary_path = run_path / "memory_summary.json"
    memory = json.loads(summary_path.read_text()) if summary_path.is_file() else summarize(rows, rounds, tolerance_mib)
    run = json.loads((run_path / "summary.json").read_text()) if (run_path / "summary.json").is_file() else {}
    return rounds, rows, memory, run


OPEN_REPLICAS = 30  # more replicas than this: their table starts folded


def _mib(value: Any) -> str:
    return f"{value:,.0f} MiB" if isinstance(value, (int, float)) else "–"


def facts(run_path: Path, rounds: list[Round], rows: list[dict[str, Any]], memory: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """The lines under the verdict: each number with what it counts, so none is misread."""
    source = "GPU memory (NVML)" if rows[0]["source"] == "nvml" else f"host memory ({measure(rows, memory)}; no GPU was visible)"
    missed = run.get("rounds_missed_by_partition") or {}
    status = html.escape(str(run.get("status", "still running or no summary.json")))
    if missed:
        status += f", but {len(missed)} partition(s) missed rounds (below: who and why)"
    out = [
        f"run <b>{html.escape(run_path.name)}</b>: {status}; {len(rounds)} round(s) recorded, final accuracy {accuracy(run.get('final_accuracy'))}",
        f"recorded: {source}, {memory.get('samples', 0)} samples",
    ]
    helpers, peak = memory.get("helpers"), memory.get("peak", {})
    if helpers:
        out.append(
            f"the run's processes, helpers included (what <code>docker stats</code> adds up, give or take page cache): "
            f"{_mib(helpers['last_overall_mib'])} at the last sample ({html.escape(helpers['last_at'][11:19])} UTC), peak {_mib(peak.get('overall_mib'))}; "
            f"of it <b>{_mib(helpers['last_mib'])} in {helpers['last_processes']} helper processes</b>: resource trackers, and with "
            f"FL_WORKER_POOL=replica each replica's idle forkserver (torch imported once, so workers start fast; with the host's worker "
            f"pool that is the pool's own line). They stay for the replica's life, so they are left "
            f"out of the baseline, the residuals, the chart and the peaks below (peak without them: {_mib(peak.get('without_helpers_mib'))})"
        )
    crowd, slots = memory.get("max_workers_alive", {}), settled_slots(rounds)
    out.append("worker slots per device (FL_WORKER_SLOTS): " + (", ".join(f"{html.escape(d)} {html.escape(str(n))}" for d, n in sorted(slots.items())) or "not recorded"))
    holding = {device: max((n for _, n in steps), default=0) for device, steps in workers_alive(clients_of(rounds)).items()}
    if crowd:
        split = f" ({crowd['client_workers']} client, {crowd['server_workers']} server evaluation)" if "client_workers" in crowd else ""
        held = ", ".join(f"{html.escape(d)} {n} of {slots.get(d, '?')}" for d, n in sorted(holding.items())) or "not recorded"
        out.append(
            f"most worker processes alive at once: {crowd.get('count')}{split} in round {crowd.get('round')}. That counts every worker "
            f"process, also those forked and still waiting for a slot (a few MiB each, nothing imported yet); the slots bound the "
            f"workers that compute: at most {held} slots held at once (FL_WORKER_SLOTS, from the workers' own start and end times)"
        )
    out.extend(refusal_facts(run))
    return out


def render(run_path: Path, tolerance_mib: float = DEFAULT_TOLERANCE_MIB, rows: list[dict[str, Any]] | None = None) -> str:
    rounds, rows, memory, run = load(run_path, tolerance_mib, rows)
    if not rows:
        raise ReportError(f"{run_path / 'memory.csv'} holds no samples")
    verdict = memory.get("verdict", {})
    tolerance = verdict.get("tolerance_mib", tolerance_mib)
    status = {True: "ok", False: "bad"}.get(verdict.get("ok"), "unknown")
    identities, servers = names_by_identity(rows), server_replicas(rows)
    workers = workers_figure(rounds, samples_of(rows)[0].t)
    workers_section = f'<h2>Workers per device</h2>\n<img alt="workers alive per device over time" src="data:image/png;base64,{workers}">' if workers else ""
    missed = missed_table(rounds, identities)
    missed_section = f"<h2>Who missed which round</h2>\n{missed}" if missed else ""
    replicas = len(memory.get("replicas", {}))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Bouquet run {html.escape(run_path.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1280px; }}
.verdict {{ font-size: 1.25em; padding: .6em 1em; border-radius: 6px; }}
.verdict.ok {{ background: #e3f4e1; }} .verdict.bad {{ background: #fbe3e1; }} .verdict.unknown {{ background: #eee; }}
.scroll {{ overflow-x: auto; max-width: 100%; }}
table {{ border-collapse: collapse; font-size: .85em; }} td, th {{ border: 1px solid #ccc; padding: .2em .5em; text-align: right; white-space: nowrap; }}
tr:first-child > th {{ white-space: normal; vertical-align: bottom; max-width: 9em; }}
th {{ background: #f4f4f4; }} tr > th:first-child {{ text-align: left; }} td.text {{ text-align: left; white-space: normal; }}
td.bad {{ background: #fbe3e1; font-weight: bold; }} tr.bad > td:first-child {{ border-left: 4px solid #d9534f; }} tr.ok > td:first-child {{ border-left: 4px solid #5cb85c; }}
img {{ max-width: 100%; }} .row {{ display: flex; gap: 1em; flex-wrap: wrap; }} li {{ margin: .2em 0; }}
</style></head><body>
<h1>Bouquet run {html.escape(run_path.name)}</h1>
<p class="verdict {status}">{html.escape(verdict.get('text', 'no verdict'))}</p>
<ul>{''.join(f'<li>{fact}</li>' for fact in facts(run_path, rounds, rows, memory, run))}</ul>
<h2>Memory over time</h2>
<img alt="memory per replica over time" src="data:image/png;base64,{memory_figure(rows, rounds, memory, servers)}">
{workers_section}
<div class="row">
<div><h2>Accuracy and loss</h2><img alt="accuracy and loss per round" src="data:image/png;base64,{quality_figure(rounds, run)}"></div>
<div><h2>Round time</h2><img alt="round time" src="data:image/png;base64,{round_time_figure(rounds)}"></div>
</div>
<h2>Rounds</h2>
<p>"Held" is the memory at the first sample after the round ended at which the round's own workers had exited (within 5 s; past that, the first sample and its workers left), counting the processes that existed then, minus the
baseline (the last sample before round 1 began, without its workers); helpers are left out of both. A replica may hold
{tolerance:g} MiB (the tolerance, per replica), the run as a whole {tolerance:g} MiB per replica measured; a marked
cell is over it, and a round marked red failed the verdict. "Worker processes alive" counts workers waiting for a slot too.</p>
{rounds_table(memory, rounds, tolerance, settled_slots(rounds))}
{missed_section}
<h2>Replicas ({replicas})</h2>
<details{" open" if replicas <= OPEN_REPLICAS else ""}><summary>baseline, peak, helpers and what each round left, per replica (MiB)</summary>
{replicas_table(memory, tolerance, partitions_by_identity(rounds, run), identities, servers)}
</details>
</body></html>
"""


def write_report(run_path: Path, tolerance_mib: float = DEFAULT_TOLERANCE_MIB, out: Path | None = None, rows: list[dict[str, Any]] | None = None) -> Path:
    """Draw the report of one run folder and write it atomically (default <run folder>/report.html);
    ``tolerance_mib`` judges the rounds when there is no memory_summary.json to take it from;
    ``rows``, memory.csv as read_rows returns it, spares a caller that holds them (the monitor,
    at the end of a long run: millions of rows) parsing the file again."""
    run_path = Path(run_path)
    page = render(run_path, tolerance_mib, rows)
    out = Path(out) if out is not None else run_path / "report.html"
    with atomic_write(out) as target:
        target.write(page)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_folder", type=Path, help="results/<run-id>")
    parser.add_argument("--out", type=Path, help="where to write the page (default: <run folder>/report.html)")
    parser.add_argument(
        "--residual-tolerance-mib", type=float, default=DEFAULT_TOLERANCE_MIB,
        help=f"used only when the run has no memory_summary.json (default {DEFAULT_TOLERANCE_MIB:g})",
    )
    args = parser.parse_args(argv)
    try:
        out = write_report(args.run_folder, args.residual_tolerance_mib, args.out)
    except ReportError as problem:
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
