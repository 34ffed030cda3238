"""The app's own ServerApp, run unchanged, with the end of every round recorded: its central
evaluation (FedAvg calls it after each round, and once before round 1) is wrapped. After the
rounds the run stays open ``linger-seconds``, so every configuration's nodes are sampled idle."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from bench_timed_app import probe
from quickstart_app import server_app as original

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    timings = str(context.run_config["timings-file"])
    evaluate = original.central_evaluate

    def timed_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = evaluate(server_round, arrays)
        probe.record(timings, event="round_end", round=server_round, accuracy=float(metrics["accuracy"]))
        return metrics

    original.central_evaluate = timed_evaluate  # the app's main looks it up when it starts its strategy
    try:
        original.main(grid, context)
    finally:
        original.central_evaluate = evaluate
    probe.record(timings, event="rounds_done")
    time.sleep(float(context.run_config["linger-seconds"]))
