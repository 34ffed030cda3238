"""Benchmark one Flower App three ways (four rows), in one run, with the same N and rounds (issue 18 item 6):

  (a) deployment  Flower's own Deployment Engine: flower-superlink, N flower-supernode and stock
                  ``flwr-clientapp``, a fresh interpreter per message (benchmarks/deployment.py)
  (b) app         Bouquet app mode (``services.launcher --app``, what ``scripts/run_local.py --app``
                  runs): every message in a worker forked from the node's warm process after a slot
  (b') app-preload the same with FL_WORKER_PRELOAD naming what the app imports (scikit-learn),
                  which the warm process then imports once instead of every message
  (c) task        Bouquet task mode on the app's own ``task.py`` (FL_TASK), with the app's
                  training settings (local epochs, batch size, learning rate)

    .venv/bin/python scripts/bench_app.py                  # N = 3, 2 rounds, all four
    .venv/bin/python scripts/bench_app.py --quick          # N = 2, 2 rounds, short idle window (CI)

The app is examples/quickstart-app, run from a copy whose components wrap the app's own
handlers with timing probes (benchmarks/timed_app: the app's code runs unchanged); (a) and (b)
run that same copy with the same run config: the app's rounds, ``fraction-evaluate = 0`` (task
mode evaluates centrally only, as the app's ServerApp does every round) and an idle window
after the rounds. Per message: (a) process start -> the ClientApp's handler (SuperExec's launch
is that process's start); (b) the launch request reaching the node -> the handler, and the
worker's fork -> the handler; (c) the worker request -> the job's start (task mode has no
ClientApp handler: the job is its counterpart). Round time: from one central evaluation to the
next ((c): task mode's own round record). Memory per replica: its process tree's PSS, sampled
by benchmarks/trees.py and summarised by benchmarks/summary.py as scripts/bench.py does.
Writes app-bench.md and app-bench.json into --out and prints the table. docs/benchmarks.md.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import shutil
import statistics
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks import bouquet, deployment, deployment_config, machine, plan
from benchmarks.bench import is_worker
from benchmarks.summary import summarize
from benchmarks.trees import TreeSampler
from services import settings as settings_module
from services.files import read_json_lines
from services.launcher import torch_threads_per_worker
from services.settings import CommandLineOnly, LocalSettings, ServerSettings, boolean, choice, comma_list, optional, path, positive_float, positive_int, reuse, setting
from services.taskspec import TaskSpec

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "quickstart-app"
PROBES = Path(__file__).resolve().parent / "timed_app" / "bench_timed_app"
PROGRAM = "bench_app.py"
CONFIGS = ("deployment", "app", "app-preload", "task")
APP_IMPORTS = ["sklearn"]  # what examples/quickstart-app imports beyond torch and flwr (its nodes' logs name it)
LABELS = {
    "deployment": "(a) Flower Deployment Engine, stock flwr-clientapp",
    "app": "(b) Bouquet app mode",
    "app-preload": f"(b') Bouquet app mode, FL_WORKER_PRELOAD={','.join(APP_IMPORTS)}",
    "task": "(c) Bouquet task mode (the app's task.py)",
}
START_MEANING = {
    "deployment": "flwr-clientapp process start → handler",
    "app": "launch request at the node → handler",
    "app-preload": "launch request at the node → handler",
    "task": "worker request → job start",
}
# The app's components as examples/quickstart-app declares them, and the probes' wrappers of them.
COMPONENTS = {"quickstart_app.server_app:app": "bench_timed_app.server_app:app", "quickstart_app.client_app:app": "bench_timed_app.client_app:app"}


@dataclass(frozen=True, kw_only=True)
class AppBenchSettings(CommandLineOnly):
    quick: bool = setting(boolean, False, "short run for CI: N=2, 2 rounds, 2 s idle window")
    configs: list[str] = setting(comma_list(choice(*CONFIGS), ", ".join(CONFIGS)), list(CONFIGS), "configurations to run, in this order")
    clients: int = setting(positive_int, 3, "clients N: SuperNodes for (a) and (b), client processes for (c)")
    rounds: int = reuse(ServerSettings, "rounds", default=2)
    idle_seconds: float = setting(positive_float, 6.0, "(a), (b): seconds the run stays open after its rounds, the nodes idle (sampled for idle memory)")
    out: str | None = setting(optional(path), None, "output folder (unset: results/app-bench/<UTC time>)")
    machine_label: str | None = setting(optional(str), None, "how the table names this machine (unset: cores + GPU)")
    interval: float = setting(positive_float, 0.25, "memory sampling interval in seconds")
    run_timeout: float = setting(positive_float, 900.0, "seconds one configuration may take before it is stopped")


QUICK = {"clients": 2, "rounds": 2, "idle_seconds": 2.0}


def parse(argv: list[str] | None) -> AppBenchSettings:
    quick = settings_module.peek(AppBenchSettings, "quick", argv, program=PROGRAM)
    return settings_module.parse(AppBenchSettings, argv, program=PROGRAM, description=__doc__, defaults=QUICK if quick else None)


# --- the app, its timed copy and its settings --------------------------------------------------


def app_config(app_dir: Path = EXAMPLE) -> dict[str, Any]:
    """The app's own run config (``[tool.flwr.app.config]``): task mode trains with the same values."""
    return tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def timed_app(into: Path, app_dir: Path = EXAMPLE) -> Path:
    """A copy of the app whose ServerApp and ClientApp are the probes' wrappers around its own
    (benchmarks/timed_app), with the probes' two run-config keys declared."""
    if into.exists():
        shutil.rmtree(into)
    shutil.copytree(app_dir, into, ignore=shutil.ignore_patterns("__pycache__", "*.fab"))
    shutil.copytree(PROBES, into / PROBES.name, ignore=shutil.ignore_patterns("__pycache__"))
    text = (into / "pyproject.toml").read_text()
    for component, wrapper in COMPONENTS.items():
        if f'"{component}"' not in text:
            raise RuntimeError(f"{app_dir / 'pyproject.toml'} no longer declares {component}: benchmarks/timed_app wraps that component")
        text = text.replace(f'"{component}"', f'"{wrapper}"')
    text = text.replace("[tool.flwr.app.config]\n", '[tool.flwr.app.config]\ntimings-file = ""\nlinger-seconds = 0.0\n', 1)
    (into / "pyproject.toml").write_text(text)
    return into


def run_config(rounds: int, timings: Path, idle_seconds: float) -> dict[str, Any]:
    """(a) and (b) alike: the app's rounds, server-side evaluation only (as task mode), the probes' file."""
    return {"num-server-rounds": rounds, "fraction-evaluate": 0.0, "timings-file": str(timings), "linger-seconds": idle_seconds}


def task_spec(config: dict[str, Any]) -> TaskSpec:
    return TaskSpec(
        task=str(EXAMPLE / "quickstart_app" / "task.py"), dataset="digits", local_epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]), learning_rate=float(config["learning-rate"]),
    )


# --- what each configuration recorded -> round records (benchmarks/summary.py's shape) ----------


def probe_rounds(timings: list[dict[str, Any]], launches: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Round records from the probes' lines. A round ends at its central evaluation (the one
    before round 1 starts round 1). Each handler line becomes a client entry whose
    ``worker_start_seconds`` is launch -> handler: (a) the process's age at the handler; (b) with
    ``launches`` (app mode's messages.jsonl, joined on the worker pid) from the node's launch
    request, plus the fork -> handler and the worker's own start and slot wait."""
    ends = {int(line["round"]): float(line["at"]) for line in timings if line.get("event") == "round_end"}
    by_pid = {int(record["pid"]): record for record in launches or [] if record.get("pid") is not None}
    rounds = []
    for number in sorted(n for n in ends if n >= 1):
        began = ends.get(number - 1)
        clients = []
        for line in timings:
            if line.get("event") != "handler" or line.get("server_round") != number:
                continue
            entry = {"partition": line["partition"], "message_type": line["message_type"], "pid": line["pid"],
                     "process_start_to_handler_seconds": round(line["process_age_seconds"], 4), "handler_seconds": round(line["handler_seconds"], 4)}
            if launches is None:
                entry["worker_start_seconds"] = entry["process_start_to_handler_seconds"]
            else:
                launch = by_pid.get(int(line["pid"]))
                if launch is None:
                    raise RuntimeError(f"no launch record in messages.jsonl for the ClientApp in process {line['pid']}")
                entry.update(worker_start_seconds=round(line["entered_at"] - launch["asked_at"], 4), bouquet_worker_start_seconds=launch.get("worker_start_seconds"),
                             slot_wait_seconds=launch.get("slot_wait_seconds"), outcome=launch.get("outcome"))
            clients.append(entry)
        rounds.append({
            "round": number, "round_seconds": None if began is None else round(ends[number] - began, 3), "ended_at_unix": ends[number],
            "accuracy": next(line.get("accuracy") for line in timings if line.get("event") == "round_end" and int(line["round"]) == number),
            "clients": clients, "clients_ok": len(clients), "clients_failed": 0,
        })
    return rounds


def message_starts(rounds: list[dict[str, Any]]) -> list[float]:
    return [c["worker_start_seconds"] for r in rounds for c in r.get("clients", []) if c.get("worker_start_seconds") is not None]


def spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None, "count": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "count": len(values)}


# --- running one configuration ---------------------------------------------------------------


def describe(s: dict[str, Any]) -> str:
    """One configuration's line on stderr as it finishes."""
    return f"message start {_range(s['message_start'], 3)} s, rounds {s['round_seconds_all']} s, idle·peak PSS/replica {_fmt(s['idle_pss_mib'], 0)}·{_fmt(s['peak_pss_mib'], 0)} MiB"


def run_one(config: str, options: AppBenchSettings, out: Path) -> tuple[list[dict[str, Any]], TreeSampler]:
    work = (out / "runs" / config).resolve()
    work.mkdir(parents=True, exist_ok=True)
    source: dict[str, Callable[[], dict[str, int]]] = {"members": dict}
    sampler = TreeSampler(lambda: source["members"](), interval=options.interval, is_worker=is_worker)
    timings = work / "timings.jsonl"

    def started_bouquet(members: Callable[[], dict[str, int]]) -> None:
        source["members"] = members

    with sampler:
        if config == "deployment":

            def started(server: list[int], clients: list[int]) -> None:
                found = {"server": server[0], **{f"client-{i}": pid for i, pid in enumerate(clients)}}
                source["members"] = lambda: found

            # Stock flwr-clientapp takes torch's default threads; OMP_NUM_THREADS gives it what
            # Bouquet's launcher gives its workers (torch reads it at import), so all share the cores alike.
            threads = {"OMP_NUM_THREADS": str(torch_threads_per_worker(options.clients))}
            deployment.run_app(work, timed_app(work / "app"), options.clients, run_config(options.rounds, timings, options.idle_seconds),
                               None, started, options.run_timeout, threads)
            rounds = probe_rounds(read_json_lines(timings)[0])
        elif config in ("app", "app-preload"):
            config_file = work / "run-config.toml"
            deployment_config.write(config_file, run_config(options.rounds, timings, options.idle_seconds))
            flags = ["--app", str(timed_app(work / "app")), "--clients", str(options.clients), "--app-run-config", str(config_file),
                     "--results-dir", str(work), "--run-id", bouquet.RUN_ID, "--data-dir", str(work / "data")]
            if config == "app-preload":
                flags += ["--worker-preload", ",".join(APP_IMPORTS)]
            folder = bouquet.run_launcher(work, flags, f"app mode, {options.clients} clients", started_bouquet, options.run_timeout)
            rounds = probe_rounds(read_json_lines(timings)[0], read_json_lines(folder / "messages.jsonl")[0])
        else:
            local = LocalSettings(data_dir=str(work / "data"), torch_threads=torch_threads_per_worker(options.clients))
            records = bouquet.run(work, options.clients, options.rounds, task_spec(app_config()), local, started_bouquet, options.run_timeout)
            rounds = [{**r, "clients": [{**c, "process_start_to_handler_seconds": None} for c in r.get("clients", [])]} for r in records]
    if len(rounds) < options.rounds:
        raise RuntimeError(f"{len(rounds)} of {options.rounds} rounds were recorded")
    return rounds, sampler


def summary_of(config: str, rounds: list[dict[str, Any]], sampler: TreeSampler) -> dict[str, Any]:
    """benchmarks/summary.py's numbers, plus every message's start (all rounds, not only round >= 2)."""
    summary = summarize(config, rounds, sampler.samples, gpu=False)
    summary["message_start"] = spread(message_starts(rounds))
    summary["fork_to_handler"] = spread([c["process_start_to_handler_seconds"] for r in rounds for c in r["clients"] if c.get("process_start_to_handler_seconds") is not None])
    summary["messages"] = len(message_starts(rounds))
    return summary


# --- the table --------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _range(s: dict[str, Any], digits: int = 2) -> str:
    if not s or s.get("median") is None:
        return "–"
    return f"{_fmt(s['median'], digits)} ({_fmt(s['min'], digits)}–{_fmt(s['max'], digits)}, n={s['count']})"


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    m = meta["machine"]
    lines = [
        f"# One Flower App three ways: {m['label']}",
        "",
        f"Run {meta['started_at']} – {meta['ended_at']} ({meta['wall_seconds'] / 60:.1f} min). {m['cpus']} CPUs ({m['cpu_model']}), "
        f"{m['memory_gib']:.1f} GiB RAM, GPU: {m['gpu'] or 'none'}. Load average at start/end: {m['load_start']} / {m['load_end']}. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.",
        f"App: examples/quickstart-app ({meta['plan']['app_config']}), N = {meta['plan']['clients']}, {meta['plan']['rounds']} rounds, "
        f"fraction-evaluate 0 (server-side evaluation only, as task mode), idle window {meta['plan']['idle_seconds']:g} s after the rounds ((a), (b)), "
        f"torch threads per message {meta['plan']['torch_threads']}.",
        f"Command: `{meta['command']}`",
        "",
        "Message start: median (min–max, n) over every message of the run, in seconds; what it spans differs by what each engine can "
        "record (next column). Round: from one central evaluation to the next (round 1 includes the first messages' cold costs). "
        "Memory per replica: the replica's whole process tree ((a) SuperNode + SuperExec + ClientApp processes; (b) node agent + SuperNode "
        "+ SuperExec + warm forkserver + workers; (c) client + forkserver + workers), PSS (shared pages split among sharers), median over "
        "replicas; idle: non-busy samples after round 1, peak: highest sample. Method: docs/benchmarks.md.",
        "",
        "| configuration | message start s | spans | fork → handler s | round 1 s | round 2+ s | idle PSS MiB/replica | peak PSS MiB/replica | peak RSS MiB/replica | final accuracy |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        s = result["summary"]
        if "error" in s:
            lines.append(f"| {LABELS[result['config']]} | failed: {s['error'][:120]} |")
            continue
        fork = _range(s["fork_to_handler"], 3) if result["config"] in ("app", "app-preload") else "–"
        lines.append(
            f"| {LABELS[result['config']]} | {_range(s['message_start'], 3)} | {START_MEANING[result['config']]} | {fork} | {_fmt(s['first_round_seconds'])} | "
            f"{_fmt(s['round_seconds'])} | {_fmt(s['idle_pss_mib'], 0)} | {_fmt(s['peak_pss_mib'], 0)} | {_fmt(s['peak_rss_mib'], 0)} | {_fmt(s['final_accuracy'], 3)} |"
        )
    lines.append("")
    return "\n".join(lines)


def write(out: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "app-bench.md", "json": out / "app-bench.json"}
    paths["table"].write_text(markdown(meta, results))
    paths["json"].write_text(json.dumps({"meta": meta, "results": results}, indent=1, sort_keys=True, default=str) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    started_at = dt.datetime.now(dt.timezone.utc)
    out = Path(options.out or REPO / "results" / "app-bench" / started_at.strftime("%Y%m%dT%H%M%SZ")).resolve()
    config = app_config()
    meta: dict[str, Any] = {
        "machine": machine.describe(options.machine_label, None),
        "versions": machine.versions(),
        "command": "scripts/bench_app.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "plan": {"configs": options.configs, "clients": options.clients, "rounds": options.rounds, "idle_seconds": options.idle_seconds,
                 "interval": options.interval, "torch_threads": torch_threads_per_worker(options.clients),
                 "app_config": ", ".join(f"{k} {config[k]}" for k in ("local-epochs", "batch-size", "learning-rate"))},
        "started_at": started_at.isoformat(timespec="seconds"),
    }
    print(f"bench_app.py: {len(options.configs)} runs into {out}", file=sys.stderr)
    results, clock = [], time.monotonic()
    for index, name in enumerate(options.configs, 1):
        began = time.monotonic()
        entry: dict[str, Any] = {"config": name}

        def measure(name=name) -> tuple[list, dict[str, Any]]:
            rounds, sampler = run_one(name, options, out)
            return rounds, summary_of(name, rounds, sampler)

        status = plan.measure_into(entry, measure, describe, "bench_app.py")
        if status is None:
            break
        entry["wall_seconds"] = round(time.monotonic() - began, 1)
        results.append(entry)
        print(f"[{index}/{len(options.configs)}] {LABELS[name]}: {status} ({entry['wall_seconds']:.0f} s)", file=sys.stderr)
    meta["ended_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta["wall_seconds"] = round(time.monotonic() - clock, 1)
    meta["machine"]["load_end"] = machine.load()
    paths = write(out, meta, results)
    print(paths["table"].read_text())
    print(f"bench_app.py: wrote {paths['table']}, {paths['json']}", file=sys.stderr)
    return 1 if any("error" in r["summary"] for r in results) or len(results) < len(options.configs) else 0


if __name__ == "__main__":
    sys.exit(main())
