"""report.html: one self-contained page (PNGs embedded) that shows a person at a glance
whether memory went back to baseline after every round.

The monitor writes it into the run folder at the end of every run, after memory_summary.json
(so compose users get it without the host's Python environment); ``python -m
services.monitor.report <run folder>`` (or scripts/report.py) draws it again for any run
folder, e.g. one whose monitor was killed.

It needs the run's metrics.jsonl and the monitor's memory.csv; memory_summary.json is used when
present (else it is computed here). Sections: the one-line verdict; memory over time per
replica with the rounds shaded; accuracy and loss per round; round time; a table of baseline,
peak and the memory each round left behind.

Figures are drawn on matplotlib Figure objects with the Agg canvas, not through pyplot, so
drawing changes no global backend or state of the process that calls it (the monitor).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from services.admission.records import workers_alive
from services.files import METRICS, atomic_write
from services.monitor.csvlog import read_rows
from services.monitor.rounds import Round, RoundLog, clients_of, settled_slots
from services.monitor.summary import samples_of, summarize

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


def figure_of(**options: Any) -> Figure:
    """A figure with its own Agg canvas: nothing registered with pyplot, nothing to close."""
    figure = Figure(**options)
    FigureCanvasAgg(figure)
    return figure


def png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def measure(rows: list[dict[str, Any]], memory: dict[str, Any]) -> str:
    """What a process's memory is in this run: GPU memory, or on the host PSS (RSS in runs
    recorded before the monitor read PSS, and where PSS was unreadable)."""
    if rows[0]["source"] == "nvml":
        return "GPU memory"
    return {"pss": "PSS", "pss+rss": "PSS (RSS where unreadable)"}.get(memory.get("host_memory", {}).get("measure"), "RSS")


def memory_figure(rows: list[dict[str, Any]], rounds: list[Round], memory: dict[str, Any]) -> str:
    samples = samples_of(rows)
    start = samples[0].t
    times = [s.t - start for s in samples]
    figure = figure_of(figsize=(11, 6.4))
    axis, lower = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for panel in (axis, lower):
        for index, current in enumerate(rounds):
            panel.axvspan(current.started - start, current.ended - start, color=("#dbe9f6" if index % 2 == 0 else "#eaf2fa"), zorder=0)
    for current in rounds:
        axis.text((current.started + current.ended) / 2 - start, 0.98, f"round {current.number}", transform=axis.get_xaxis_transform(), ha="center", va="top", fontsize=8)
    replicas = sorted({r["replica"] for s in samples for r in s.processes})
    series: dict[str, list[float]] = defaultdict(list)
    long_lived: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        held = sample.by_replica(held=True)  # like the summary: constant helpers left out
        own = defaultdict(float)
        for row in sample.processes:
            if row["role"] in ("client", "server"):
                own[row["replica"]] += row["memory_mib"] or 0.0
        for name in replicas:
            series[name].append(held.get(name, 0.0))
            long_lived[name].append(own.get(name, float("nan")))
    for name in replicas:
        line, = axis.plot(times, series[name], linewidth=1.1, label=name)
        if any(value == value for value in long_lived[name]):  # not all NaN: the process itself was sampled
            lower.plot(times, long_lived[name], linewidth=1.1, color=line.get_color())
    own_title = "Client and server processes' own GPU memory (none in worker mode)" if rows[0]["source"] == "nvml" else "Client and server processes alone (should stay flat)"
    lower.set(xlabel="seconds since the monitor's first sample", ylabel="MiB", title=own_title)
    lower.grid(alpha=0.3)
    overall_label = "device used" if rows[0]["source"] == "nvml" else "all of the run's processes"
    axis.plot(times, [s.overall(held=True) for s in samples], color="black", linewidth=1.6, label=overall_label)
    baseline = memory.get("baseline", {}).get("overall_mib")
    if baseline is not None:
        axis.axhline(baseline, color="black", linestyle="--", linewidth=0.8, label="baseline")
    axis.set(
        ylabel=f"{measure(rows, memory)} (MiB)",
        title="Memory per replica: its processes and workers (rounds shaded; forkserver and resource tracker left out)",
    )
    axis.legend(fontsize=7, ncol=max(1, len(replicas) // 12 + 1), loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.grid(alpha=0.3)
    return png(figure)


def quality_figure(rounds: list[Round], run: dict[str, Any]) -> str:
    numbers = [r.number for r in rounds]
    accuracy = [r.record.get("accuracy") for r in rounds]
    loss = [r.record.get("loss") for r in rounds]
    if run.get("initial_accuracy") is not None:
        numbers, accuracy, loss = [0, *numbers], [run["initial_accuracy"], *accuracy], [run.get("initial_loss"), *loss]
    figure = figure_of(figsize=(5.4, 3.4))
    left = figure.subplots()
    left.plot(numbers, [a if a is not None else float("nan") for a in accuracy], marker="o", color="tab:green", label="accuracy")
    left.set(xlabel="round (0 = initial model)", ylabel="server-side accuracy", title="Accuracy and loss per round")
    right = left.twinx()
    right.plot(numbers, [v if v is not None else float("nan") for v in loss], marker="s", color="tab:red", label="loss")
    right.set_ylabel("loss")
    left.set_xticks(numbers)
    figure.legend(loc="upper center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, 0.88))
    return png(figure)


def round_time_figure(rounds: list[Round]) -> str:
    numbers = [r.number for r in rounds]
    figure = figure_of(figsize=(5.4, 3.4))
    axis = figure.subplots()
    axis.bar(numbers, [r.record.get("round_seconds", r.ended - r.started) for r in rounds], color="tab:blue", label="round")
    starts = [_mean([c.get("worker_start_seconds") for c in r.record.get("clients", [])]) for r in rounds]
    if any(value is not None for value in starts):
        axis.plot(numbers, [v if v is not None else float("nan") for v in starts], marker="o", color="tab:orange", label="mean worker start")
    axis.set(xlabel="round", ylabel="seconds", title="Round time")
    axis.set_xticks(numbers)
    axis.legend(fontsize=8)
    return png(figure)


def workers_figure(rounds: list[Round], start: float) -> str | None:
    """Training workers holding a slot, per device, with the settled slots as dashed lines."""
    series = workers_alive(clients_of(rounds))
    if not series:
        return None
    slots = settled_slots(rounds)
    figure = figure_of(figsize=(11, 2.8))
    axis = figure.subplots()
    for index, current in enumerate(rounds):
        axis.axvspan(current.started - start, current.ended - start, color=("#dbe9f6" if index % 2 == 0 else "#eaf2fa"), zorder=0)
    for device, steps in sorted(series.items()):
        line, = axis.step([t - start for t, _ in steps], [n for _, n in steps], where="post", label=f"{device} workers")
        if isinstance(slots.get(device), int):
            axis.axhline(slots[device], color=line.get_color(), linestyle="--", linewidth=0.9, label=f"{device} slots ({slots[device]})")
    axis.set(xlabel="seconds since the monitor's first sample", ylabel="workers", title="Training workers holding a slot, per device (dashed: slots in force)")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.grid(alpha=0.3)
    return png(figure)


def _mean(values: list[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else None


def _accuracy(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else _cell(value)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if isinstance(value, float) else html.escape(str(value))


def table(memory: dict[str, Any], tolerance: float) -> str:
    baseline = memory.get("baseline", {})
    replicas = sorted(set(baseline.get("per_replica_mib", {})) | {n for r in memory.get("rounds", []) for n in r.get("residual_per_replica_mib", {})})
    head = "".join(f"<th>{html.escape(name)}</th>" for name in replicas)
    lines = [f"<tr><th></th><th>overall</th>{head}<th>workers left</th></tr>"]
    per = baseline.get("per_replica_mib", {})
    lines.append(f"<tr><td>baseline (MiB)</td><td>{_cell(baseline.get('overall_mib'))}</td>{''.join(f'<td>{_cell(per.get(n))}</td>' for n in replicas)}<td></td></tr>")
    peak = memory.get("peak", {})
    peaks = {name: info.get("peak_mib") for name, info in memory.get("replicas", {}).items()}
    lines.append(f"<tr><td>peak (MiB)</td><td>{_cell(peak.get('overall_mib'))}</td>{''.join(f'<td>{_cell(peaks.get(n))}</td>' for n in replicas)}<td></td></tr>")
    for record in memory.get("rounds", []):
        residuals = record.get("residual_per_replica_mib", {})
        cells = []
        for name in [None, *replicas]:
            value = record.get("residual_mib") if name is None else residuals.get(name)
            bad = value is not None and value > tolerance
            cells.append(f"<td class=\"{'bad' if bad else ''}\">{_cell(value)}</td>")
        left = record.get("workers_left")
        cells.append(f"<td class=\"{'bad' if left else ''}\">{_cell(left)}</td>")
        lines.append(f"<tr><td>held after round {record['round']} (MiB above baseline)</td>{''.join(cells)}</tr>")
    return "<table>" + "\n".join(lines) + "</table>"


def render(run_path: Path, tolerance_mib: float = DEFAULT_TOLERANCE_MIB, rows: list[dict[str, Any]] | None = None) -> str:
    rounds, rows, memory, run = load(run_path, tolerance_mib, rows)
    if not rows:
        raise ReportError(f"{run_path / 'memory.csv'} holds no samples")
    verdict = memory.get("verdict", {})
    tolerance = verdict.get("tolerance_mib", tolerance_mib)
    status = {True: "ok", False: "bad"}.get(verdict.get("ok"), "unknown")
    source = "GPU memory (NVML)" if rows[0]["source"] == "nvml" else f"host memory ({measure(rows, memory)}; no GPU was visible)"
    crowd = memory.get("max_workers_alive", {})
    slots = settled_slots(rounds)
    workers = workers_figure(rounds, samples_of(rows)[0].t)
    facts = [
        f"run <b>{html.escape(run_path.name)}</b>: {html.escape(str(run.get('status', 'still running or no summary.json')))}, "
        f"{len(rounds)} round(s) recorded, final accuracy {_accuracy(run.get('final_accuracy'))}",
        f"recorded: {source}, {memory.get('samples', 0)} samples",
        f"most workers alive at once: {_cell(crowd.get('count'))} (round {_cell(crowd.get('round'))})",
        "worker slots per device (FL_WORKER_SLOTS): " + (", ".join(f"{html.escape(d)} {_cell(n)}" for d, n in sorted(slots.items())) or "not recorded"),
    ]
    workers_section = f'<h2>Workers per device</h2>\n<img alt="workers alive per device over time" src="data:image/png;base64,{workers}">' if workers else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Bouquet run {html.escape(run_path.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }}
.verdict {{ font-size: 1.25em; padding: .6em 1em; border-radius: 6px; }}
.verdict.ok {{ background: #e3f4e1; }} .verdict.bad {{ background: #fbe3e1; }} .verdict.unknown {{ background: #eee; }}
table {{ border-collapse: collapse; font-size: .9em; }} td, th {{ border: 1px solid #ccc; padding: .25em .6em; text-align: right; }}
td:first-child {{ text-align: left; }} td.bad {{ background: #fbe3e1; font-weight: bold; }}
img {{ max-width: 100%; }} .row {{ display: flex; gap: 1em; flex-wrap: wrap; }}
</style></head><body>
<h1>Bouquet run {html.escape(run_path.name)}</h1>
<p class="verdict {status}">{html.escape(verdict.get('text', 'no verdict'))}</p>
<ul>{''.join(f'<li>{fact}</li>' for fact in facts)}</ul>
<h2>Memory over time</h2>
<img alt="memory per replica over time" src="data:image/png;base64,{memory_figure(rows, rounds, memory)}">
{workers_section}
<div class="row">
<div><h2>Accuracy and loss</h2><img alt="accuracy and loss per round" src="data:image/png;base64,{quality_figure(rounds, run)}"></div>
<div><h2>Round time</h2><img alt="round time" src="data:image/png;base64,{round_time_figure(rounds)}"></div>
</div>
<h2>Baseline, peak and what each round left behind</h2>
<p>"Held after round N" is the memory at the first sample after round N ended, counting the processes that existed then,
minus the baseline (the last sample before round 1 began, without its workers); helper processes
(multiprocessing's resource tracker) are left out of both. Cells above the tolerance ({tolerance:g} MiB) are marked.</p>
{table(memory, tolerance)}
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
