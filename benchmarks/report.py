"""Write a benchmark's results: a Markdown table per data set with ratios to spawn, the
server-side scaling table, headline ratios, the JSON with every number, and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.summary import median

CONFIG_LABELS = {
    "inprocess": "(a) in-process",
    "spawn": "(b) spawn worker",
    "forkserver": "(c) forkserver worker",
    "deployment": "(d) Deployment Engine",
    "forkserver-unlimited": "(c') forkserver worker, unlimited slots",
}
BASELINE = "spawn"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return ""
    return f" (×{value / base:.2f})"


def _cell(value: float | None, base: float | None, digits: int = 2) -> str:
    return _fmt(value, digits) + _ratio(value, base)


def headline(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The closing numbers: medians over all (data set, N) cells of per-cell ratios."""

    def ratios(metric: str, numerator: str, denominator: str) -> float | None:
        values = []
        for dataset, clients in {(c["dataset"], c["clients"]) for c in cells}:
            row = {c["config"]: c["summary"] for c in cells if c["dataset"] == dataset and c["clients"] == clients}
            top = row.get(numerator, {}).get(metric)
            bottom = row.get(denominator, {}).get(metric)
            if top is not None and bottom:
                values.append(top / bottom)
        return median(values)

    out: dict[str, Any] = {
        "worker_start_forkserver_vs_spawn": ratios("worker_start_seconds", "forkserver", "spawn"),
        "worker_start_deployment_vs_spawn": ratios("worker_start_seconds", "deployment", "spawn"),
    }
    for config in ("spawn", "forkserver", "deployment"):
        out[f"round_time_{config}_vs_inprocess"] = ratios("round_seconds", config, "inprocess")
    for config in ("spawn", "forkserver"):
        out[f"round_time_deployment_vs_{config}"] = ratios("round_seconds", "deployment", config)
        out[f"peak_pss_deployment_vs_{config}"] = ratios("peak_pss_mib", "deployment", config)
        out[f"idle_pss_{config}_vs_inprocess"] = ratios("idle_pss_mib", config, "inprocess")
    out["idle_pss_forkserver_vs_spawn"] = ratios("idle_pss_mib", "forkserver", "spawn")
    out["peak_pss_forkserver_vs_spawn"] = ratios("peak_pss_mib", "forkserver", "spawn")
    return out


def markdown(meta: dict[str, Any], cells: list[dict[str, Any]], gpu: bool) -> str:
    lines = [
        f"# Bouquet benchmark: {meta['machine']['label']}",
        "",
        f"Run {meta['started_at']} – {meta['ended_at']} ({meta['wall_seconds'] / 60:.1f} min). "
        f"{meta['machine']['cpus']} CPUs ({meta['machine']['cpu_model']}), {meta['machine']['memory_gib']:.1f} GiB RAM, "
        f"GPU: {meta['machine']['gpu'] or 'none'}. Load average at start/end: {meta['machine']['load_start']} / {meta['machine']['load_end']}.",
        f"Rounds per run: {meta['plan']['rounds']}; repeats: {meta['plan']['repeats']}; local epochs {meta['plan']['task']['local_epochs']}, "
        f"batch {meta['plan']['task']['batch_size']}, synthetic samples {meta['plan']['task']['synthetic_samples']}, device {meta['plan']['device']}.",
        f"Command: `{meta['command']}`",
        "",
        "Times are medians over rounds ≥ 2 (round 1 carries one-off costs and is shown apart). Memory is per client, "
        "for the client's whole process tree (client, resource tracker, forkserver, workers; for (d) the SuperNode, its "
        "SuperExec and ClientApp processes): RSS counts pages shared between processes once per process (a forkserver and "
        "the workers forked from it share torch), PSS splits them among their sharers. Idle: between rounds after round 1; "
        "peak: highest sample (PSS is sampled less often, so its peak can miss short spikes). "
        f"(×r) is the ratio to {CONFIG_LABELS[BASELINE]}. Method: docs/benchmarks.md.",
        "",
        "![plot of the tables below](bench.png)",
        "",
    ]
    gpu_head = " peak GPU MiB/client | residual GPU MiB after a round |" if gpu else ""
    gpu_rule = "---:|---:|" if gpu else ""
    for dataset in meta["plan"]["datasets"]:
        lines += [f"## {dataset}", ""]
        lines.append(
            "| clients | configuration | round s | first round s | worker start s | train s | idle RSS · PSS MiB/client | peak RSS · PSS MiB/client |"
            + gpu_head + " final accuracy | failed |"
        )
        lines.append("|---:|---|---:|---:|---:|---:|---:|---:|" + gpu_rule + "---:|---:|")
        for clients in meta["plan"]["clients"]:
            row = {c["config"]: c["summary"] for c in cells if c["dataset"] == dataset and c["clients"] == clients}
            base = row.get(BASELINE, {})
            for config in meta["plan"]["configs"]:
                s = row.get(config)
                if s is None:
                    continue
                if "error" in s:
                    lines.append(f"| {clients} | {CONFIG_LABELS[config]} | failed: {s['error'][:80]} |")
                    continue
                gpu_cells = (
                    f" {_cell(s.get('peak_gpu_mib'), base.get('peak_gpu_mib'), 0)} | {_fmt(s.get('residual_gpu_mib'), 0)} |" if gpu else ""
                )
                lines.append(
                    f"| {clients} | {CONFIG_LABELS[config]} | {_cell(s['round_seconds'], base.get('round_seconds'))} | "
                    f"{_fmt(s['first_round_seconds'])} | {_cell(s['worker_start_seconds'], base.get('worker_start_seconds'), 3)} | "
                    f"{_fmt(s['train_seconds'])} | {_cell(s['idle_rss_mib'], base.get('idle_rss_mib'), 0)} · {_cell(s.get('idle_pss_mib'), base.get('idle_pss_mib'), 0)} | "
                    f"{_cell(s['peak_rss_mib'], base.get('peak_rss_mib'), 0)} · {_cell(s.get('peak_pss_mib'), base.get('peak_pss_mib'), 0)} |{gpu_cells} {_fmt(s['final_accuracy'], 3)} | {s['clients_failed']:g} |"
                )
        lines.append("")
    lines += _federation_peaks(meta, cells)
    lines += _scaling(meta, cells)
    lines += ["## Headline ratios (median over data sets and client counts)", ""]
    for key, value in headline(cells).items():
        lines.append(f"- `{key}`: {_fmt(value, 3)}")
    lines.append("")
    return "\n".join(lines)


def _federation_peaks(meta: dict[str, Any], cells: list[dict[str, Any]]) -> list[str]:
    """The whole federation's host memory at its highest (all members summed per sampling pass)
    and the most workers alive at once: what worker admission (FL_WORKER_SLOTS) bounds."""
    lines = ["## Whole federation: peak host memory and workers alive at once", "",
             "| data set | clients | configuration | round s | peak RSS MiB (all) | peak PSS MiB (all) | most workers alive |", "|---|---:|---|---:|---:|---:|---:|"]
    for cell in cells:
        s = cell["summary"]
        if "error" in s or s.get("peak_total_rss_mib") is None:
            continue
        lines.append(
            f"| {cell['dataset']} | {cell['clients']} | {CONFIG_LABELS[cell['config']]} | {_fmt(s['round_seconds'])} | "
            f"{_fmt(s['peak_total_rss_mib'], 0)} | {_fmt(s.get('peak_total_pss_mib'), 0)} | {_fmt(s.get('most_workers_alive'), 0)} |"
        )
    return lines + [""]


def _scaling(meta: dict[str, Any], cells: list[dict[str, Any]]) -> list[str]:
    """Server side vs N: FedAvg aggregation time and the server's memory (its whole process tree:
    for Bouquet the server and its evaluation workers; for (d) the SuperLink and its ServerApp)."""
    configs = meta["plan"]["configs"]
    lines = [
        "## Server side as the federation grows",
        "",
        "Aggregation: FedAvg over the clients' weights, per round (median over rounds ≥ 2). Server memory: peak RSS · PSS of the "
        "server's process tree over the run (Bouquet: server + its evaluation worker; (d): SuperLink + ServerApp).",
        "",
    ]
    for dataset in meta["plan"]["datasets"]:
        lines.append(f"### {dataset}")
        lines.append("")
        lines.append("| clients | " + " | ".join(f"{CONFIG_LABELS[c]}: aggregation ms / server peak RSS · PSS MiB" for c in configs) + " |")
        lines.append("|---:|" + "---:|" * len(configs))
        for clients in meta["plan"]["clients"]:
            row = {c["config"]: c["summary"] for c in cells if c["dataset"] == dataset and c["clients"] == clients}
            parts = []
            for config in configs:
                s = row.get(config, {})
                aggregate = s.get("aggregate_seconds")
                parts.append(f"{_fmt(None if aggregate is None else aggregate * 1000, 1)} / {_fmt(s.get('server_peak_rss_mib'), 0)} · {_fmt(s.get('server_peak_pss_mib'), 0)}")
            lines.append(f"| {clients} | " + " | ".join(parts) + " |")
        lines.append("")
    return lines


def plot(meta: dict[str, Any], cells: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("round_seconds", "median round time (s)", False),
        ("worker_start_seconds", "worker start (s, log scale)", True),
        ("idle_pss_mib", "idle PSS per client (MiB)", False),
        ("peak_pss_mib", "peak PSS per client (MiB)", False),
        ("aggregate_seconds", "server: FedAvg aggregation per round (s)", False),
        ("server_peak_pss_mib", "server: peak PSS (MiB)", False),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    styles = {dataset: style for dataset, style in zip(meta["plan"]["datasets"], ["-o", "--s", ":^"])}
    for axis, (metric, title, log) in zip(axes.flat, panels):
        for config in meta["plan"]["configs"]:
            for dataset in meta["plan"]["datasets"]:
                points = sorted(
                    (c["clients"], c["summary"].get(metric))
                    for c in cells
                    if c["config"] == config and c["dataset"] == dataset and c["summary"].get(metric) is not None
                )
                if points:
                    axis.plot(*zip(*points), styles[dataset], label=f"{CONFIG_LABELS[config]}, {dataset}", color=f"C{list(CONFIG_LABELS).index(config)}")
        axis.set_title(title)
        axis.set_xlabel("clients")
        axis.set_xticks(meta["plan"]["clients"])
        if log:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=9)
    figure.suptitle(f"Bouquet benchmark: {meta['machine']['label']} ({meta['started_at'][:16]} UTC)")
    figure.tight_layout(rect=(0, 0.07, 1, 0.96))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(out_dir: Path, meta: dict[str, Any], cells: list[dict[str, Any]], runs: list[dict[str, Any]], gpu: bool) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"table": out_dir / "bench.md", "json": out_dir / "bench.json", "plot": out_dir / "bench.png"}
    paths["table"].write_text(markdown(meta, cells, gpu))
    payload = {"meta": meta, "headline": headline(cells), "cells": cells, "runs": runs}
    paths["json"].write_text(json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n")
    plot(meta, cells, paths["plot"])
    return paths
