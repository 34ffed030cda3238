"""The figures of report.html, each a base64 PNG: memory per replica over time, training
workers per device against the slots, accuracy and loss, round time.

Drawn on matplotlib Figure objects with the Agg canvas, not through pyplot, so drawing changes
no global backend or state of the process that calls it (the monitor). Readable at 100 replicas
as at 3: past LEGEND_REPLICAS the replicas are thin lines of one colour without a legend entry
each (the per-replica numbers are in the report's table), the run's total stays on top.
"""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from services.admission.records import workers_alive
from services.monitor.rounds import Round, clients_of, settled_slots
from services.monitor.summary import samples_of

LEGEND_REPLICAS = 12  # more replicas than this: one legend entry for all of them


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


def memory_figure(rows: list[dict[str, Any]], rounds: list[Round], memory: dict[str, Any], servers: frozenset[str] = frozenset({"server"})) -> str:
    """``servers``: the server's replica names, drawn with a legend entry of their own among many replicas."""
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
    servers = servers | {r["replica"] for s in samples for r in s.processes if r["role"] == "pool"}  # the pool: a named line too
    series: dict[str, list[float]] = defaultdict(list)
    long_lived: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        held = sample.by_replica(held=True)  # like the summary: constant helpers left out
        own = defaultdict(float)
        for row in sample.processes:
            if row["role"] in ("client", "server", "pool"):
                own[row["replica"]] += row["memory_mib"] or 0.0
        for name in replicas:
            series[name].append(held.get(name, 0.0))
            long_lived[name].append(own.get(name, float("nan")))
    crowd = len(replicas) > LEGEND_REPLICAS
    first_thin = next((index for index, name in enumerate(replicas) if name not in servers), 0)
    thin_count = sum(1 for name in replicas if name not in servers)
    for index, name in enumerate(replicas):
        thin = crowd and name not in servers
        style = {"linewidth": 0.6, "color": "tab:blue", "alpha": 0.45} if thin else {"linewidth": 1.1}
        label = (f"each thin line: one client replica ({thin_count})" if index == first_thin else "_nolegend_") if thin else name
        line, = axis.plot(times, series[name], label=label, **style)
        if any(value == value for value in long_lived[name]):  # not all NaN: the process itself was sampled
            lower.plot(times, long_lived[name], linewidth=style["linewidth"], color=line.get_color(), alpha=style.get("alpha", 1.0))
    own_title = "Client and server processes' own GPU memory (none in worker mode)" if rows[0]["source"] == "nvml" else "Client, server and worker-pool processes alone (should stay flat)"
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
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
