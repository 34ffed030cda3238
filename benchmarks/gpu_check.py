"""Check the real NVML path on a GPU machine: run a local federation on the GPU with the memory
monitor in the two worker modes (a fresh worker every round, forked from the forkserver, the
default, or spawned) and in in-process mode (training in the client process: the memory problem
Bouquet exists to solve), then print the memory summaries side by side and save them.

    .venv/bin/python scripts/gpu_check.py --clients 2,4 --rounds 3 --out docs/measurements

    .venv/bin/python scripts/gpu_check.py --admission --out docs/measurements

(``scripts/gpu_check.py`` runs this module, ``benchmarks.gpu_check``.)

``--admission`` checks worker admission instead: 20 clients on ONE GPU (CUDA_VISIBLE_DEVICES=0)
training resnet18 on 32x32 synthetic images with batch 128, with FL_WORKER_SLOTS=auto versus
unlimited: peak device memory, CUDA out-of-memory failures and retries, round time, the slots
auto settled on and the most workers alive at once.

Expected: worker mode returns to baseline after every round; in-process mode keeps memory in
every client process (a CUDA context and cached blocks each), so what is held grows with the
number of clients. Each run's monitor also writes its report.html into its run folder. Needs an
NVIDIA GPU with a working driver (NVML); exits 1 with the reason where there is none.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from services import settings
from services.files import read_rounds
from services.monitor.nvml import NvmlUnavailable, open_nvml
from services.settings import CommandLineOnly, ServerSettings, TaskSource, boolean, comma_list, path, positive_int, reuse, setting
from services.taskspec import check_model_fits

REPO = Path(__file__).resolve().parent.parent

MODES = ("forkserver", "spawn", "inprocess")  # the first two are worker modes


@dataclass(frozen=True, kw_only=True)
class GpuCheckSettings(CommandLineOnly):
    clients: list[int] = setting(comma_list(positive_int, "client counts >= 1, e.g. 2,4"), [2, 4], "client counts to run")
    rounds: int = reuse(ServerSettings, "rounds", default=3)
    dataset: str = reuse(TaskSource, "dataset")
    model: str = reuse(TaskSource, "model")
    results_dir: str = setting(path, str(REPO / "results" / "gpu_check"), "folder for the runs' folders")
    out: str = setting(path, str(REPO / "docs" / "measurements"), "where the side-by-side summary and both memory summaries go")
    admission: bool = setting(boolean, False, "check worker admission instead: 20 clients of resnet18 (batch 128) on one GPU, slots auto vs unlimited")


def validate(options: GpuCheckSettings) -> GpuCheckSettings:
    check_model_fits(options.dataset, options.model)
    # The launcher runs in the repository; this reads the run folders from here.
    return dataclasses.replace(options, results_dir=str(Path(options.results_dir).resolve()), out=str(Path(options.out).resolve()))


def parse(argv: list[str]) -> tuple[GpuCheckSettings, list[str]]:
    """This script's options, and the launcher settings after ``--`` (the launcher checks them)."""
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    return settings.parse(GpuCheckSettings, ours, program="gpu_check.py", description=__doc__, validate=validate), extra


def machine() -> dict[str, object]:
    """What the numbers were measured on; exits 1 where there is no GPU."""
    try:
        reader = open_nvml()
    except NvmlUnavailable as reason:
        print(f"gpu_check.py: error: no usable GPU here ({reason}); run it on a machine with an NVIDIA GPU and driver", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        driver = reader.nvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        totals = [round(device.total_mib) for device in reader.read().devices]
    finally:
        reader.close()
    return {"host": platform.node(), "gpus": reader.names, "gpu_memory_mib": totals, "driver": driver, "python": platform.python_version()}


def run(mode: str, clients: int, args: GpuCheckSettings, extra: list[str], run_id: str) -> dict[str, object]:
    command = [
        sys.executable, "-m", "services.launcher", "--monitor",
        "--clients", str(clients), "--rounds", str(args.rounds), "--dataset", args.dataset, "--model", args.model,
        "--device", "cuda", "--worker-start", mode, "--results-dir", args.results_dir, "--run-id", run_id, *extra,
    ]
    print(f"== {mode} mode, {clients} clients: {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "FL_MONITOR_SOURCE": "nvml"})
    folder = Path(args.results_dir) / run_id
    summary_path = folder / "memory_summary.json"
    memory = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    run_summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    return {"mode": mode, "clients": clients, "run_id": run_id, "exit_code": done.returncode, "memory": memory, "run": run_summary}


ADMISSION_RUN = ["--clients", "20", "--dataset", "synthetic", "--model", "resnet18", "--batch-size", "128", "--local-epochs", "1", "--synthetic-samples", "20000"]


def admission_run(slots: str, args: GpuCheckSettings, extra: list[str], run_id: str) -> dict[str, object]:
    """20 clients on GPU 0 with FL_WORKER_SLOTS=slots; what the admission bounds and what it costs."""
    command = [
        sys.executable, "-m", "services.launcher", "--monitor", *ADMISSION_RUN, "--rounds", str(args.rounds), "--device", "cuda",
        "--worker-slots", slots, "--results-dir", args.results_dir, "--run-id", run_id, *extra,
    ]
    print(f"== admission {slots}: {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "FL_MONITOR_SOURCE": "nvml", "CUDA_VISIBLE_DEVICES": "0"})
    folder = Path(args.results_dir) / run_id
    rounds = read_rounds(folder)
    memory = json.loads((folder / "memory_summary.json").read_text()) if (folder / "memory_summary.json").is_file() else {}
    clients = [c for r in rounds for c in r.get("clients", [])]
    failures = [f for r in rounds for f in r.get("failures", [])]
    times = sorted(r["round_seconds"] for r in rounds[1:] or rounds)
    return {
        "slots": slots, "run_id": run_id, "exit_code": done.returncode,
        "peak_device_mib": memory.get("peak", {}).get("overall_mib"),
        "oom_failures": sum("out of memory" in str(f.get("cause", "")).lower() for f in failures),
        "failures": len(failures),
        "retried_after_oom": sum(bool(c.get("retried_after_oom")) for c in clients),
        "median_round_seconds": times[len(times) // 2] if times else None,
        "first_round_seconds": rounds[0]["round_seconds"] if rounds else None,
        "slots_per_device": rounds[-1].get("slots_per_device") if rounds else None,
        "most_workers_alive": max((max(r.get("concurrent_workers_peak", {}).values(), default=0) for r in rounds), default=None),
        "max_slot_wait_seconds": max((c.get("slot_wait_seconds") or 0 for c in clients), default=None),
    }


def admission_table(results: list[dict[str, object]]) -> list[str]:
    keys = ["exit_code", "peak_device_mib", "oom_failures", "failures", "retried_after_oom", "first_round_seconds", "median_round_seconds",
            "slots_per_device", "most_workers_alive", "max_slot_wait_seconds"]
    lines = ["| | " + " | ".join(f"slots {r['slots']}" for r in results) + " |", "|---|" + "---|" * len(results)]
    lines += [f"| {key} | " + " | ".join(_fmt(r[key]) for r in results) + " |" for key in keys]
    return lines


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if isinstance(value, float) else str(value)


def table(results: list[dict[str, object]], rounds: int) -> list[str]:
    heads = [f"{r['mode']} ×{r['clients']}" for r in results]
    lines = ["| | " + " | ".join(heads) + " |", "|---|" + "---|" * len(results)]

    def row(name, pick):
        lines.append(f"| {name} | " + " | ".join(_fmt(pick(r)) for r in results) + " |")

    row("run status", lambda r: r["run"].get("status", f"exit {r['exit_code']}"))
    row("final accuracy", lambda r: None if r["run"].get("final_accuracy") is None else f"{r['run']['final_accuracy']:.3f}")
    row("baseline, device used (MiB)", lambda r: r["memory"].get("baseline", {}).get("overall_mib"))
    row("peak above baseline (MiB)", lambda r: r["memory"].get("peak", {}).get("above_baseline_mib"))
    row("most workers alive at once", lambda r: r["memory"].get("max_workers_alive", {}).get("count"))
    for number in range(1, rounds + 1):
        row(f"held after round {number} (MiB)", lambda r, n=number: next((x["residual_mib"] for x in r["memory"].get("rounds", []) if x["round"] == n), None))
        row(f"  largest replica after round {number} (MiB)", lambda r, n=number: next((max(x["residual_per_replica_mib"].values(), default=None) for x in r["memory"].get("rounds", []) if x["round"] == n), None))
    row("verdict", lambda r: "ok" if r["memory"].get("verdict", {}).get("ok") else ("not ok" if r["memory"] else "no summary"))
    return lines


def write(stem: Path, lines: list[str], host: dict[str, object], results: list[dict[str, object]]) -> None:
    """Print the table and save it as <stem>.md, with every number in <stem>.json."""
    print("\n".join(lines))
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join(lines))
    stem.with_suffix(".json").write_text(json.dumps({"machine": host, "results": results}, indent=2, sort_keys=True) + "\n")
    print(f"wrote {stem.with_suffix('.md')} and .json")


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    host = machine()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if args.admission:
        return _admission_check(args, extra, host, stamp, argv)
    results = [run(mode, clients, args, extra, f"gpu-check-{stamp}-{mode}-{clients}") for clients in args.clients for mode in MODES]
    lines = [
        f"# gpu_check {stamp}",
        "",
        f"Machine: {host['host']}; GPU: {', '.join(host['gpus'])} ({', '.join(map(str, host['gpu_memory_mib']))} MiB); driver {host['driver']}; Python {host['python']}.",
        f"Run: {args.rounds} rounds of {args.dataset} (model {args.model}) on CUDA, monitor on NVML; `scripts/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`.",
        "",
        *table(results, args.rounds),
        "",
        *[f"- {r['mode']} ×{r['clients']} ({r['run_id']}): {r['memory'].get('verdict', {}).get('text', 'no memory summary')}" for r in results],
        "",
    ]
    write(Path(args.out) / f"gpu_check-{stamp}", lines, host, results)
    return 0 if all(r["exit_code"] == 0 for r in results if r["mode"] != "inprocess") else 1


def _admission_check(args: GpuCheckSettings, extra: list[str], host: dict[str, object], stamp: str, argv: list[str] | None) -> int:
    results = [admission_run(slots, args, extra, f"gpu-admission-{stamp}-{slots}") for slots in ("auto", "unlimited")]
    lines = [
        f"# gpu_check --admission {stamp}",
        "",
        f"Machine: {host['host']}; GPU 0 of: {', '.join(host['gpus'])} ({', '.join(map(str, host['gpu_memory_mib']))} MiB); driver {host['driver']}; Python {host['python']}.",
        f"Run: `run_local.py {' '.join(ADMISSION_RUN)} --rounds {args.rounds} --device cuda --worker-slots auto|unlimited`, CUDA_VISIBLE_DEVICES=0, monitor on NVML;"
        f" `scripts/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`.",
        "",
        *admission_table(results),
        "",
    ]
    write(Path(args.out) / f"gpu_check-admission-{stamp}", lines, host, results)
    return 0 if results[0]["exit_code"] == 0 and results[0]["oom_failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
