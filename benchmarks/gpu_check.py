"""Check the real NVML path on a GPU machine: run a local federation on the GPU with the memory
monitor in the two worker modes (a fresh worker every round, forked from the forkserver, the
default, or spawned) and in in-process mode (training in the client process: the memory problem
Bouquet exists to solve), then print the memory summaries side by side and save them.

    .venv/bin/python scripts/gpu_check.py --clients 2,4 --rounds 3 --out docs/measurements

(``scripts/gpu_check.py`` runs this module, ``benchmarks.gpu_check``.)

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
from services.monitor.nvml import NvmlUnavailable, open_nvml
from services.settings import CommandLineOnly, ServerSettings, TaskSource, comma_list, path, positive_int, reuse, setting
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


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    host = machine()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
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
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_check-{stamp}.md").write_text("\n".join(lines))
    (out / f"gpu_check-{stamp}.json").write_text(json.dumps({"machine": host, "results": results}, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out / f'gpu_check-{stamp}.md'} and .json")
    return 0 if all(r["exit_code"] == 0 for r in results if r["mode"] != "inprocess") else 1


if __name__ == "__main__":
    sys.exit(main())
