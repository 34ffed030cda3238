"""ServerApp: FedAvg over all SuperNodes with central evaluation after every round, like
Bouquet's server, writing one JSON line per round (same fields as Bouquet's metrics.jsonl
that the benchmark reads) to the run config's ``rounds-file``.

Central evaluation runs in this ServerApp process, which the SuperLink starts for the run.
"""

from __future__ import annotations

import json
import time
from typing import Iterable

from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from services import task  # imports torch
from benchmarks.deployment_config import placement, task_spec

app = ServerApp()


class RecordingFedAvg(FedAvg):
    """FedAvg that keeps each round's per-client metrics and its aggregation time."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clients: list[dict] = []
        self.aggregate_seconds = 0.0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.clients = [dict(reply.content["metrics"]) for reply in replies if reply.has_content()]
        started = time.perf_counter()
        outcome = super().aggregate_train(server_round, replies)
        self.aggregate_seconds = time.perf_counter() - started
        return outcome


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    spec, where = task_spec(config), placement(config)
    clients = int(config["num-clients"])
    strategy = RecordingFedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients
    )
    rounds_file = str(config["rounds-file"])
    last = {"ended": 0.0}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        scored = task.evaluate(spec, where, arrays.to_numpy_ndarrays())
        now = time.monotonic()
        if server_round > 0:
            record = {
                "round": server_round,
                "round_seconds": round(now - last["ended"], 3),
                "ended_at_unix": time.time(),
                "aggregate_seconds": round(strategy.aggregate_seconds, 6),
                "accuracy": scored["accuracy"],
                "loss": scored["loss"],
                "clients_ok": len(strategy.clients),
                "clients": strategy.clients,
            }
            with open(rounds_file, "a") as out:
                out.write(json.dumps(record) + "\n")
        last["ended"] = now
        return MetricRecord({"accuracy": scored["accuracy"], "loss": scored["loss"]})

    torch_seed_weights = task.initial_weights(spec)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(torch_seed_weights),
        num_rounds=int(config["num-server-rounds"]),
        timeout=spec.worker_timeout + 120,
        evaluate_fn=evaluate,
    )
