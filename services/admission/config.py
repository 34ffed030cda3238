"""The Admission a client or the server gives its workers: what its settings say about slots
(``worker_admission``, built once), and the need key of each job of the task (``for_job``)."""

from __future__ import annotations

import dataclasses
import hashlib
import os

from services.admission.gate import Admission
from services.settings import LocalSettings
from services.taskspec import TaskSpec


def slots_dir(settings: LocalSettings) -> str:
    return settings.slots_dir or os.path.join(settings.data_dir, "slots")


def worker_admission(settings: LocalSettings) -> Admission:
    """The settings' share of admission (FL_SLOTS_DIR, FL_WORKER_SLOTS, FL_WORKER_MEMORY_MIB,
    FL_DEVICE): all a client or the server keeps of its settings to admit its workers."""
    return Admission(slots_dir=slots_dir(settings), slots=settings.worker_slots, memory_mib=settings.worker_memory_mib, device=settings.device)


def for_job(admission: Admission, job: str, spec: TaskSpec) -> Admission:
    """Workers of one job of one task share a remembered need (a training job needs more than an evaluation)."""
    identity = "|".join(str(part) for part in (job, spec.task, spec.task_sha256, spec.model, spec.dataset, spec.batch_size))
    return dataclasses.replace(admission, need_key=hashlib.sha256(identity.encode()).hexdigest()[:16])
