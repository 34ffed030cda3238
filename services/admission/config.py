"""The Admission a client or the server gives its workers, from its settings and the task."""

from __future__ import annotations

import hashlib
import os

from services.admission.gate import Admission
from services.settings import LocalSettings
from services.taskspec import TaskSpec


def slots_dir(settings: LocalSettings) -> str:
    return settings.slots_dir or os.path.join(settings.data_dir, "slots")


def admission_for(settings: LocalSettings, job: str, spec: TaskSpec) -> Admission:
    """Workers of one job of one task share a remembered need (a training job needs more than an evaluation)."""
    identity = "|".join(str(part) for part in (job, spec.task, spec.task_sha256, spec.model, spec.dataset, spec.batch_size))
    return Admission(
        slots_dir=slots_dir(settings),
        slots=settings.worker_slots,
        memory_mib=settings.worker_memory_mib,
        device=settings.device,
        need_key=hashlib.sha256(identity.encode()).hexdigest()[:16],
    )
