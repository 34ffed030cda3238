"""Server-side work that needs torch, run in worker processes like the clients' training:
the seeded initial model and the evaluation on the held-out test split after every round."""

from __future__ import annotations

import logging

import numpy as np

from services import worker
from services.taskspec import Placement, TaskSpec

log = logging.getLogger("bouquet.server")


class CentralEvaluator:
    def __init__(self, spec: TaskSpec, placement: Placement, start_method: str) -> None:
        self.spec = spec
        self.placement = placement
        self.start_method = start_method

    def initial_weights(self) -> list[np.ndarray]:
        result = worker.run(
            "services.task:initial_weights", {"spec": self.spec}, timeout=self.spec.worker_timeout, start_method=self.start_method
        )
        return result.value

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float]:
        """(loss, accuracy) of the global model on the whole test split."""
        result = worker.run(
            "services.task:evaluate",
            {"spec": self.spec, "placement": self.placement, "weights": weights},
            timeout=self.spec.worker_timeout,
            start_method=self.start_method,
        )
        log.info("central evaluation in worker pid %d took %.2f s", result.pid, result.total_seconds)
        return result.value["loss"], result.value["accuracy"]
