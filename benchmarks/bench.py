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

import dataclasses
import datetime as dt
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil

from benchmarks import bouquet, deployment, machine, plan, report
from benchmarks.summary import pool, summarize
from services import settings as settings_module
from services.launcher import torch_threads_per_worker
from services.settings import (
    CommandLineOnly, LocalSettings, ServerSettings, TaskSource, TrainingSettings, boolean, choice, comma_list,
    optional, path, positive_float, positive_int, reuse, setting, values_of,
)
from services.taskspec import Placement, TaskSpec, check_model_fits
from services.monitor.processes import is_worker_process
from benchmarks.trees import TreeSampler, gpu_name

REPO = Path(__file__).resolve().parent.parent
PROGRAM = "bench.py"


@dataclass(frozen=True, kw_only=True)
class BenchSettings(CommandLineOnly, TrainingSettings):
    """The benchmark's options; the training settings are the federation's (TrainingSettings),
    some with shorter defaults to keep runs short. The defaults are the full plan."""

    quick: bool = setting(boolean, False, "tiny run for CI: digits, N=2, 2 rounds, all four configurations")
    admission: bool = setting(boolean, False, "the admission case: 20 clients of digits, forkserver workers with FL_WORKER_SLOTS=auto versus unlimited, 3 rounds")
    render: str | None = setting(optional(path), None, "only rewrite bench.md/bench.png next to an existing bench.json (no runs)")
    configs: list[str] = setting(comma_list(choice(*plan.CONFIGS, *plan.EXTRA_CONFIGS), ", ".join(plan.CONFIGS + plan.EXTRA_CONFIGS)), list(plan.CONFIGS), "configurations to run")
    datasets: list[str] = setting(comma_list(choice(*plan.DATASETS), ", ".join(plan.DATASETS)), list(plan.DATASETS), "data sets")
    clients: list[int] = setting(comma_list(positive_int, "integers >= 1"), [2, 5, 10, 20], "client counts N")
    rounds: int = reuse(ServerSettings, "rounds", default=4)
    repeats: int = setting(positive_int, 1, "how many times every run is repeated (interleaved)")
    local_epochs: int = reuse(TrainingSettings, "local_epochs", default=1)
    batch_size: int = reuse(TrainingSettings, "batch_size", default=32)
    synthetic_samples: int = reuse(TrainingSettings, "synthetic_samples", default=2000)
    model: str = reuse(TaskSource, "model")
    device: str = reuse(LocalSettings, "device")
    data_dir: str = reuse(LocalSettings, "data_dir")
    out: str | None = setting(optional(path), None, "output folder (unset: results/bench/<UTC time>)")
    machine_label: str | None = setting(optional(path), None, "how the tables name this machine (unset: cores + GPU)")
    interval: float = setting(positive_float, 0.25, "memory sampling interval in seconds")
    run_timeout: float = setting(positive_float, 1800.0, "seconds one run may take before it is stopped")


QUICK = {"datasets": ["digits"], "clients": [2], "rounds": 2}  # --quick: these defaults instead
# --admission: 20 clients with FL_WORKER_SLOTS=auto (the default) versus unlimited.
ADMISSION = {"configs": ["forkserver", "forkserver-unlimited"], "datasets": ["digits"], "clients": [20], "rounds": 3, "repeats": 1}


def validate(options: BenchSettings) -> BenchSettings:
    for dataset in options.datasets:  # one --model for every data set of the plan
        check_model_fits(dataset, options.model)
    return options


def parse(argv: list[str] | None) -> BenchSettings:
    quick = settings_module.peek(BenchSettings, "quick", argv, program=PROGRAM)
    admission = settings_module.peek(BenchSettings, "admission", argv, program=PROGRAM)
    defaults = QUICK if quick else ADMISSION if admission else None
    return settings_module.parse(BenchSettings, argv, program=PROGRAM, description=__doc__, validate=validate, defaults=defaults)


def task_for(options: BenchSettings, dataset: str) -> TaskSpec:
    """The task every engine trains on ``dataset``: the federation's TaskSpec, built from the
    benchmark's training settings."""
    return TaskSpec(**values_of(options, TrainingSettings), dataset=dataset, model=options.model)


def local_for(options: BenchSettings, clients: int) -> LocalSettings:
    """Where every engine's workers compute: the launcher's torch threads for N clients, for the
    Deployment Engine's ClientApps and ServerApp too."""
    return LocalSettings(data_dir=str(Path(options.data_dir).resolve()), device=options.device, torch_threads=torch_threads_per_worker(clients))


def is_worker(process: psutil.Process) -> bool:
    """A process doing one round's work: a Bouquet worker (the monitor's rule) or a Deployment
    Engine ClientApp."""
    try:
        if any("flwr-clientapp" in part for part in process.cmdline()):
            return True
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return is_worker_process(process)


def describe(s: dict[str, Any]) -> str:
    """One configuration's line on stderr as it finishes."""
    return f"round {s['round_seconds']:.2f} s, peak total RSS {s['peak_total_rss_mib'] or 0:.0f} MiB, worker start {s['worker_start_seconds'] if s['worker_start_seconds'] is None else round(s['worker_start_seconds'], 3)} s, peak RSS·PSS/client {s['peak_rss_mib'] or 0:.0f}·{s['peak_pss_mib'] or 0:.0f} MiB, idle PSS {s['idle_pss_mib'] or 0:.0f} MiB"


def run_one(run: plan.Run, options: BenchSettings, out: Path) -> tuple[list[dict[str, Any]], TreeSampler]:
    work = out / "runs" / run.name
    source: dict[str, Callable[[], dict[str, int]]] = {"members": dict}
    sampler = TreeSampler(lambda: source["members"](), interval=options.interval, is_worker=is_worker)
    spec, local = task_for(options, run.dataset), local_for(options, run.clients)
    with sampler:
        if run.config == "deployment":

            def started(server: list[int], clients: list[int]) -> None:
                found = {"server": server[0], **{f"client-{i}": pid for i, pid in enumerate(clients)}}
                source["members"] = lambda: found

            result = deployment.run(work, run.clients, options.rounds, spec, Placement.from_settings(local), started, options.run_timeout)
            rounds = result.rounds
        else:

            def started_bouquet(members: Callable[[], dict[str, int]]) -> None:
                source["members"] = members

            start, slots = plan.start_and_slots(run.config)
            rounds = bouquet.run(
                work, run.clients, options.rounds, spec, dataclasses.replace(local, worker_start=start, worker_slots=slots), started_bouquet,
                options.run_timeout,
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
    gpu_model = gpu_name()
    gpu = gpu_model is not None and options.device != "cpu"
    meta: dict[str, Any] = {
        "machine": machine.describe(options.machine_label, gpu_model if gpu else None),
        "versions": machine.versions(),
        "command": "scripts/bench.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "plan": {
            "configs": options.configs, "datasets": options.datasets, "clients": options.clients, "rounds": options.rounds,
            "repeats": options.repeats, "device": options.device, "interval": options.interval,
            "task": values_of(options, TrainingSettings),
            "torch_threads": {str(n): torch_threads_per_worker(n) for n in options.clients},
            "order": [r.name for r in runs],
        },
        "started_at": started_at.isoformat(timespec="seconds"),
    }
    print(f"bench.py: {len(runs)} runs into {out}", file=sys.stderr)
    records, clock = [], time.monotonic()
    for index, run in enumerate(runs, 1):
        began = time.monotonic()
        entry: dict[str, Any] = {"name": run.name, "config": run.config, "dataset": run.dataset, "clients": run.clients, "repeat": run.repeat}

        def measure(run=run) -> tuple[list, dict[str, Any]]:
            rounds, sampler = run_one(run, options, out)
            return rounds, summarize(run.config, rounds, sampler.samples, gpu)

        status = plan.measure_into(entry, measure, describe, "bench.py")
        if status is None:
            break
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
