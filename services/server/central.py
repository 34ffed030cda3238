"""Server-side work that needs torch, run in worker processes like the clients' training:
checking the task module, the seeded initial model and the evaluation on the task's held-out
data after every round."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from services import worker
from services.taskspec import Placement, TaskSpec

log = logging.getLogger("bouquet.server")


class CentralEvaluator:
    def __init__(self, spec: TaskSpec, placement: Placement, start_method: str) -> None:
        self.spec = spec
        self.placement = placement
        self.start_method = start_method

    def inspect(self) -> dict[str, Any]:
        """What the task module offers (services.task.inspect), checked in a worker: raises
        WorkerFailed with the reason when FL_TASK is unusable."""
        return worker.run("services.task:inspect", {"task": self.spec.task}, timeout=self.spec.worker_timeout, start_method=self.start_method).value

    def initial_weights(self) -> list[np.ndarray]:
        result = worker.run(
            "services.task:initial_weights", {"spec": self.spec, "placement": self.placement},
            timeout=self.spec.worker_timeout, start_method=self.start_method,
        )
        return result.value

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, dict[str, Any]]:
        """(loss, metrics with at least accuracy) of the global model on the task's held-out data."""
        result = worker.run(
            "services.task:evaluate",
            {"spec": self.spec, "placement": self.placement, "weights": weights},
            timeout=self.spec.worker_timeout,
            start_method=self.start_method,
        )
        log.info("central evaluation in worker pid %d took %.2f s", result.pid, result.total_seconds)
        return result.value["loss"], result.value["metrics"]
