"""Server-side work that needs torch, run in worker processes like the clients' training:
checking the task module, the seeded initial model and the evaluation on the task's held-out
data after every round."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from services import worker
from services.admission import config as admission_config, retry
from services.admission.gate import Admission
from services.taskspec import Placement, TaskSpec

log = logging.getLogger("bouquet.server")


class CentralEvaluator:
    def __init__(self, spec: TaskSpec, placement: Placement, start_method: str, admission: Admission | None = None) -> None:
        """``admission``: the server's share of admission (``admission.config.worker_admission``);
        its evaluation workers take slots like the clients' (None: no admission)."""
        self.spec = spec
        self.placement = placement
        self.start_method = start_method
        self.admission = admission
        self._sizing_logged = False

    def _run(self, job: str, inputs: dict[str, Any]) -> worker.WorkerResult:
        admission = admission_config.for_job(self.admission, job, self.spec) if self.admission is not None else None
        result, _ = retry.run(job, inputs, timeout=self.spec.worker_timeout, start_method=self.start_method, admission=admission)
        if result.admitted and not self._sizing_logged:  # once per run: how the slots were sized and why
            self._sizing_logged = True
            log.info(
                "worker slots (FL_WORKER_SLOTS=%s): %s has %s; the clients size theirs the same way on their devices",
                self.admission.slots, result.admitted["device"], result.admitted["sizing"],
            )
        return result

    def inspect(self) -> dict[str, Any]:
        """What the task module offers (services.task.check_task), checked in a worker: raises
        WorkerFailed with the reason when FL_TASK is unusable."""
        return worker.run("services.task:check_task", {"task": self.spec.task}, timeout=self.spec.worker_timeout, start_method=self.start_method).value

    def initial_weights(self) -> list[np.ndarray]:
        return self._run("services.task:initial_weights", {"spec": self.spec, "placement": self.placement}).value

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, dict[str, Any]]:
        """(loss, metrics with at least accuracy) of the global model on the task's held-out data."""
        result = self._run("services.task:evaluate", {"spec": self.spec, "placement": self.placement, "weights": weights})
        log.info("central evaluation in worker pid %d took %.2f s", result.pid, result.total_seconds)
        return result.value["loss"], result.value["metrics"]
