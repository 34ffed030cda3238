"""Benchmark what per-round worker isolation costs: the same federation, side by side, under

  (a) inprocess   training inside the client process (the memory problem; the floor for time)
  (b) spawn       a fresh interpreter per round (FL_WORKER_START=spawn)
  (c) forkserver  a worker forked from a torch-preloaded forkserver (FL_WORKER_START=forkserver)
  (d) deployment  Flower's Deployment Engine: flower-superlink + one flower-supernode per client,
                  a new ClientApp process per message (benchmarks/deployment_app)

    .venv/bin/python scripts/bench.py              # full: synthetic + digits, N = 2,5,10,20
    .venv/bin/python scripts/bench.py --quick      # tiny smoke run (CI)
    .venv/bin/python scripts/bench.py --clients 2,5 --datasets digits --rounds 3 --repeats 2
    .venv/bin/python scripts/bench.py --admission  # 20 clients, worker slots auto vs unlimited

(``scripts/bench.py`` runs this module, ``benchmarks.bench``.) Runs are interleaved (see
benchmarks/plan.py). Writes bench.md (tables with ratios to spawn,
server-side scaling), bench.json (every number) and bench.png into --out, and prints the
table. On a machine with an NVIDIA GPU (seen through NVML) workers train on it and the
tables add peak and per-round residual device memory per client. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import psutil

from benchmarks import bouquet, deployment, machine, plan, report
from benchmarks.sampler import TreeSampler
from benchmarks.summary import pool, summarize
from services import settings as settings_module
from services.taskspec import resolve_model

REPO = Path(__file__).resolve().parent.parent

FULL = {"configs": list(plan.CONFIGS), "datasets": list(plan.DATASETS), "clients": [2, 5, 10, 20], "rounds": 4, "repeats": 1}
QUICK = {"configs": list(plan.CONFIGS), "datasets": ["digits"], "clients": [2], "rounds": 2, "repeats": 1}
# Admission of workers to slots: 20 clients with FL_WORKER_SLOTS=auto (the default) versus unlimited.
ADMISSION = {"configs": ["forkserver", "forkserver-unlimited"], "datasets": ["digits"], "clients": [20], "rounds": 3, "repeats": 1}


OPTIONS = [
    # (flag, parser, help); defaults come from FULL / QUICK or the fallback below
    ("--configs", settings_module.comma_list(settings_module.choice(*plan.CONFIGS, *plan.EXTRA_CONFIGS), ", ".join(plan.CONFIGS + plan.EXTRA_CONFIGS)), "configurations to run"),
    ("--datasets", settings_module.comma_list(settings_module.choice(*plan.DATASETS), ", ".join(plan.DATASETS)), "data sets"),
    ("--clients", settings_module.comma_list(settings_module.positive_int, "integers >= 1"), "client counts N"),
    ("--rounds", settings_module.positive_int, "rounds per run (round 1 is reported apart)"),
    ("--repeats", settings_module.positive_int, "how many times every run is repeated (interleaved)"),
    ("--local-epochs", settings_module.positive_int, "local epochs per round [1]"),
    ("--batch-size", settings_module.positive_int, "training batch size [32]"),
    ("--learning-rate", settings_module.positive_float, "SGD learning rate [0.05]"),
    ("--synthetic-samples", settings_module.positive_int, "size of the synthetic data set [2000]"),
    ("--model", settings_module.choice(*settings_module.MODELS), "model (auto: digits-cnn / cifar-cnn) [auto]"),
    ("--device", settings_module.choice(*settings_module.DEVICES), "where workers compute; auto uses a GPU when there is one [auto]"),
    ("--data-dir", settings_module.path, "data cache shared by all runs [data]"),
    ("--out", settings_module.path, "output folder [results/bench/<UTC time>]"),
    ("--machine-label", settings_module.path, "how the tables name this machine [cores + GPU]"),
    ("--interval", settings_module.positive_float, "memory sampling interval in seconds [0.25]"),
    ("--run-timeout", settings_module.positive_float, "seconds one run may take before it is stopped [1800]"),
]
FALLBACK = {
    "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "synthetic_samples": 2000, "model": "auto", "device": "auto",
    "data_dir": "data", "out": None, "machine_label": None, "interval": 0.25, "run_timeout": 1800.0,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run for CI: digits, N=2, 2 rounds, all four configurations")
    parser.add_argument("--admission", action="store_true", help="the admission case: 20 clients of digits, forkserver workers with FL_WORKER_SLOTS=auto versus unlimited, 3 rounds")
    parser.add_argument("--render", metavar="BENCH_JSON", help="only rewrite bench.md/bench.png next to an existing bench.json (no runs)")
    for flag, _, help_text in OPTIONS:
        parser.add_argument(flag, default=None, help=help_text)
    raw = parser.parse_args(argv)
    base = QUICK if raw.quick else ADMISSION if raw.admission else FULL
    values = {}
    for flag, parse_value, _ in OPTIONS:
        name = flag[2:].replace("-", "_")
        text = getattr(raw, name)
        if text is None:
            values[name] = base.get(name, FALLBACK.get(name))
            continue
        try:
            values[name] = parse_value(text)
        except ValueError as allowed:
            print(f"bench.py: error: {flag} = {text!r}: {allowed}", file=sys.stderr)
            raise SystemExit(settings_module.EXIT_BAD_SETTING)
    if values["model"] != "auto" and len(values["datasets"]) > 1 and values["model"] != "resnet18":
        print(f"bench.py: error: --model = {values['model']!r} fits one data set only; use auto or resnet18 with several --datasets", file=sys.stderr)
        raise SystemExit(settings_module.EXIT_BAD_SETTING)
    values["quick"] = raw.quick
    values["render"] = raw.render
    return argparse.Namespace(**values)


def task_for(options: argparse.Namespace, dataset: str) -> dict[str, Any]:
    return {
        "dataset": dataset, "model": resolve_model(dataset, options.model), "local_epochs": options.local_epochs,
        "batch_size": options.batch_size, "learning_rate": options.learning_rate, "partitioning": "iid",
        "dirichlet_alpha": 0.5, "seed": 0, "synthetic_samples": options.synthetic_samples, "worker_timeout": 600.0,
    }


def is_worker(process: psutil.Process) -> bool:
    """A process doing one round's work: a spawned or forked Bouquet worker, or a ClientApp."""
    command = " ".join(process.cmdline())
    if "spawn_main" in command or "flwr-clientapp" in command:
        return True
    if "forkserver import main" in command:  # the forkserver itself, or a worker forked from it
        parent = process.parent()
        return parent is not None and "forkserver import main" in " ".join(parent.cmdline())
    return False


def run_one(run: plan.Run, options: argparse.Namespace, out: Path) -> tuple[list[dict[str, Any]], TreeSampler]:
    work = out / "runs" / run.name
    source: dict[str, Callable[[], dict[str, int]]] = {"members": dict}
    sampler = TreeSampler(lambda: source["members"](), interval=options.interval, is_worker=is_worker)
    data_dir = Path(options.data_dir)
    with sampler:
        if run.config == "deployment":

            def started(server: list[int], clients: list[int]) -> None:
                found = {"server": server[0], **{f"client-{i}": pid for i, pid in enumerate(clients)}}
                source["members"] = lambda: found

            result = deployment.run(
                work, run.clients, options.rounds, task_for(options, run.dataset), data_dir, options.device, started, options.run_timeout
            )
            rounds = result.rounds
        else:

            def started_bouquet(members: Callable[[], dict[str, int]]) -> None:
                source["members"] = members

            rounds = bouquet.run(
                work, run.config, run.clients, options.rounds, task_for(options, run.dataset), data_dir, options.device,
                started_bouquet, options.run_timeout,
            )
    return rounds, sampler


def render(path: Path) -> int:
    """Re-draw the table and plot of a finished benchmark from its JSON."""
    try:
        payload = json.loads(path.read_text())
        meta, cells, runs = payload["meta"], payload["cells"], payload["runs"]
    except (OSError, ValueError, KeyError) as problem:
        print(f"bench.py: error: --render = {str(path)!r}: not a readable bench.json ({problem})", file=sys.stderr)
        return settings_module.EXIT_BAD_SETTING
    paths = report.write(path.parent, meta, cells, runs, meta["machine"].get("gpu") is not None)
    print(paths["table"].read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    if options.render:
        return render(Path(options.render))
    started_at = dt.datetime.now(dt.timezone.utc)
    out = Path(options.out or REPO / "results" / "bench" / started_at.strftime("%Y%m%dT%H%M%SZ")).resolve()
    runs = plan.interleaved(options.configs, options.datasets, options.clients, options.repeats)
    probe = TreeSampler(dict)
    gpu = probe.gpu.available and options.device != "cpu"
    meta: dict[str, Any] = {
        "machine": machine.describe(options.machine_label, probe.gpu.name if gpu else None),
        "versions": machine.versions(),
        "command": "scripts/bench.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "plan": {
            "configs": options.configs, "datasets": options.datasets, "clients": options.clients, "rounds": options.rounds,
            "repeats": options.repeats, "device": options.device, "interval": options.interval,
            "task": {k: v for k, v in task_for(options, options.datasets[0]).items() if k not in ("dataset", "model")},
            "order": [r.name for r in runs],
        },
        "started_at": started_at.isoformat(timespec="seconds"),
    }
    print(f"bench.py: {len(runs)} runs into {out}", file=sys.stderr)
    records, clock = [], time.monotonic()
    for index, run in enumerate(runs, 1):
        began = time.monotonic()
        entry: dict[str, Any] = {"name": run.name, "config": run.config, "dataset": run.dataset, "clients": run.clients, "repeat": run.repeat}
        try:
            rounds, sampler = run_one(run, options, out)
            entry.update(rounds=rounds, summary=summarize(run.config, rounds, sampler.samples, gpu))
            s = entry["summary"]
            status = f"round {s['round_seconds']:.2f} s, peak total RSS {s['peak_total_rss_mib'] or 0:.0f} MiB, worker start {s['worker_start_seconds'] if s['worker_start_seconds'] is None else round(s['worker_start_seconds'], 3)} s, peak RSS·PSS/client {s['peak_rss_mib'] or 0:.0f}·{s['peak_pss_mib'] or 0:.0f} MiB, idle PSS {s['idle_pss_mib'] or 0:.0f} MiB"
        except KeyboardInterrupt:
            print("bench.py: interrupted; writing what was measured so far", file=sys.stderr)
            break
        except Exception as problem:
            entry.update(rounds=[], summary={"error": f"{type(problem).__name__}: {problem}"}, traceback=traceback.format_exc())
            status = f"FAILED: {str(problem).splitlines()[0]}"
        entry["wall_seconds"] = round(time.monotonic() - began, 1)
        records.append(entry)
        print(f"[{index}/{len(runs)}] {run.dataset} N={run.clients} {run.config}: {status} ({entry['wall_seconds']:.0f} s)", file=sys.stderr)

    cells = []
    for key in dict.fromkeys((r["config"], r["dataset"], r["clients"]) for r in records):
        mine = [r["summary"] for r in records if (r["config"], r["dataset"], r["clients"]) == key and "error" not in r["summary"]]
        failed = [r["summary"] for r in records if (r["config"], r["dataset"], r["clients"]) == key and "error" in r["summary"]]
        cells.append({"config": key[0], "dataset": key[1], "clients": key[2], "summary": pool(mine) if mine else failed[0]})
    meta["ended_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta["wall_seconds"] = round(time.monotonic() - clock, 1)
    meta["machine"]["load_end"] = machine.load()
    paths = report.write(out, meta, cells, records, gpu)
    print(paths["table"].read_text())
    print(f"bench.py: wrote {paths['table']}, {paths['json']}, {paths['plot']}", file=sys.stderr)
    return 1 if any("error" in r["summary"] for r in records) or len(records) < len(runs) else 0


if __name__ == "__main__":
    sys.exit(main())
