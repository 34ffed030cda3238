"""ClientApp: train one round on this SuperNode's partition, in the process the SuperNode
started for this message (the Deployment Engine's own per-message process isolation).

torch is imported at module level on purpose: the time from this process's creation until
``train`` runs is the Deployment Engine's counterpart of Bouquet's worker start time.
"""

from __future__ import annotations

import os
import resource
import time

import psutil
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from services import task  # imports torch
from benchmarks.deployment_config import placement, task_spec

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    entered = time.time()
    process_start_seconds = entered - psutil.Process().create_time()
    result = task.train(
        task_spec(context.run_config),
        placement(context.run_config),
        msg.content["arrays"].to_numpy_ndarrays(),
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
        int(msg.content["config"]["server-round"]),
    )
    numeric = {k: float(v) for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    metrics = {
        **numeric,
        "num-examples": result["num_examples"],
        "partition": int(context.node_config["partition-id"]),
        "worker_pid": os.getpid(),
        "supernode_pid": os.getppid(),
        "worker_start_seconds": round(process_start_seconds, 4),
        "worker_seconds": round(time.time() - psutil.Process().create_time(), 4),
        "worker_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    content = RecordDict({"arrays": ArrayRecord(result["weights"]), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
