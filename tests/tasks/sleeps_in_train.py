"""The built-in task, except that ``train`` only sleeps a fixed time (and trains nothing): a job
of known length, so a test can build a queue for one worker slot longer than FL_WORKER_TIMEOUT
out of jobs each well within it (tests/test_budget.py)."""

from __future__ import annotations

import time

from services.builtin_task import Net, configure, load_centralized_dataset, load_data, test  # noqa: F401

SECONDS = 8.0


def train(net, trainloader, epochs, lr, device) -> float:
    time.sleep(SECONDS)
    return 0.0
