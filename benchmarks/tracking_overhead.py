"""What tracking costs a round: the same local federation with every tracker on (MLflow on a
real ``mlflow server`` on loopback, TensorBoard files, the Prometheus endpoint) and with all of
them off, interleaved on / off so drift of a shared machine falls on both. Each run's round
seconds come from its metrics.jsonl; round 1 is left out (it includes the federation's settling
and the first workers' start). The ratios are round time on / off, of the means
and of the medians (the median resists one run slowed by whatever else the machine does).
Target: <= 1.05.

    .venv/bin/python scripts/bench_tracking.py --repeats 3
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.tracking_servers import REPO, MlflowServer, free_port
from services import settings as settings_module
from services.files import read_rounds
from services.settings import CommandLineOnly, ServerSettings, TrainingSettings, optional, path, positive_int, reuse, setting


@dataclass(frozen=True, kw_only=True)
class TrackingBenchSettings(CommandLineOnly):
    clients: int = setting(positive_int, 3, "clients of each federation")
    rounds: int = reuse(ServerSettings, "rounds", default=6)
    local_epochs: int = reuse(TrainingSettings, "local_epochs", default=2)
    repeats: int = setting(positive_int, 3, "pairs of runs (tracking on, tracking off), interleaved")
    out: str | None = setting(optional(path), None, "folder for the runs and tracking-bench.json / .md (unset: results/tracking-bench/<temp name>)")


def one_run(values: TrackingBenchSettings, results: Path, run_id: str, tracking: MlflowServer | None) -> list[float]:
    argv = [sys.executable, "scripts/run_local.py", "--clients", str(values.clients), "--rounds", str(values.rounds), "--dataset", "digits",
            "--local-epochs", str(values.local_epochs), "--results-dir", str(results), "--run-id", run_id, "--resume", "never"]
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    if tracking is not None:
        env["MLFLOW_TRACKING_URI"] = tracking.uri
        argv += ["--server-metrics-port", str(free_port()), "--mlflow-experiment", "tracking-bench"]
    else:
        argv += ["--tensorboard", "false"]
    done = subprocess.run(argv, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run {run_id} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return [record["round_seconds"] for record in read_rounds(results / run_id) if record["round"] > 1]


def main(argv: list[str] | None = None) -> int:
    values = settings_module.parse(TrackingBenchSettings, argv, program="bench_tracking", description=__doc__)
    if values.out:
        out = Path(values.out)
        out.mkdir(parents=True, exist_ok=True)
    else:
        (REPO / "results" / "tracking-bench").mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(dir=REPO / "results" / "tracking-bench"))
    mlflow = MlflowServer(out).start()
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for repeat in range(values.repeats):
            for mode in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
                rounds = one_run(values, out / "runs", f"{mode}-{repeat}", mlflow if mode == "on" else None)
                seconds[mode] += rounds
                print(f"repeat {repeat + 1}/{values.repeats}, tracking {mode}: mean round {statistics.mean(rounds):.3f} s", flush=True)
    finally:
        mlflow.stop()
    mean = {mode: statistics.mean(values_) for mode, values_ in seconds.items()}
    result = {
        "clients": values.clients, "rounds": values.rounds, "local_epochs": values.local_epochs, "repeats": values.repeats,
        "round_seconds": seconds, "mean_round_seconds": mean,
        "median_round_seconds": {mode: statistics.median(values_) for mode, values_ in seconds.items()},
        "ratio_on_off": mean["on"] / mean["off"],
    }
    result["ratio_on_off_median"] = result["median_round_seconds"]["on"] / result["median_round_seconds"]["off"]
    (out / "tracking-bench.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (
        f"| tracking | rounds measured | mean round s | median round s |\n| --- | --- | --- | --- |\n"
        + "".join(f"| {mode} | {len(seconds[mode])} | {mean[mode]:.3f} | {result['median_round_seconds'][mode]:.3f} |\n" for mode in ("on", "off"))
        + f"\nratio on / off: **{result['ratio_on_off']:.3f}** (means), **{result['ratio_on_off_median']:.3f}** (medians)\n"
    )
    (out / "tracking-bench.md").write_text(table)
    print(table)
    print(f"written: {out / 'tracking-bench.json'}, {out / 'tracking-bench.md'}")
    return 0
