"""A job that ran out of CUDA memory gets one more try, alone on a device.

Runs in the client or server process (never imports torch): the first out-of-memory raises
the remembered need of this task (so later rounds admit fewer workers at once) and the job
runs again in a fresh worker that waits for a whole device; only a second out-of-memory fails
it, with a cause that says where and how much.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from services import worker
from services.admission.gate import Admission
from services.admission.sizing import NeedBook

log = logging.getLogger("bouquet.admission")


def run(
    job: str, kwargs: dict[str, Any], *, timeout: float, start_method: str, admission: Admission | None, wait_timeout: float | None = None,
    warm: worker.Warm | None = None,
) -> tuple[worker.WorkerResult, bool]:
    """(the worker's result, whether it was retried after an out-of-memory); raises WorkerFailed.
    Each attempt waits for its slot up to ``wait_timeout`` and runs up to ``timeout`` (services.budget)."""
    if start_method == "inprocess":
        admission = None  # no fresh process, nothing to admit (the comparison mode)
    try:
        return worker.run(job, kwargs, timeout=timeout, start_method=start_method, admission=admission, wait_timeout=wait_timeout, warm=warm), False
    except worker.WorkerFailed as failure:
        if admission is None or not failure.out_of_memory:
            raise
        first, first_pid = failure.admitted or {}, failure.pid
    need = admission.memory_mib or NeedBook(admission.slots_dir).raise_after_oom(admission.need_key, first.get("share_mib"))
    log.warning(
        "%s worker (pid %s) ran out of memory on %s with %s slots; retrying once alone on a device (need now ~%.0f MiB)",
        job.partition(":")[2], first_pid, first.get("device"), first.get("slots"), need,
    )
    try:
        alone = dataclasses.replace(admission, exclusive=True)
        return worker.run(job, kwargs, timeout=timeout, start_method=start_method, admission=alone, wait_timeout=wait_timeout, warm=warm), True
    except worker.WorkerFailed as second:
        if not second.out_of_memory:
            raise
        where = (second.admitted or first).get("device", "?")
        cause = f"CUDA out of memory on GPU {where.partition(':')[2] or where} (needed ~{need:.0f} MiB, slots {first.get('slots')})"
        raise worker.WorkerFailed(cause, second.pid, out_of_memory=True, admitted=second.admitted, traceback=second.traceback, error_type=second.error_type, detail=second.detail) from second
