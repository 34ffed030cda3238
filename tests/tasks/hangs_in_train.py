"""The built-in task, except that ``train`` never returns: the worker is stuck until it is killed,
so FL_WORKER_TIMEOUT is the only way out of the round (tests/test_client.py)."""

from __future__ import annotations

import time

from services.builtin_task import Net, configure, load_centralized_dataset, load_data, test  # noqa: F401


def train(net, trainloader, epochs, lr, device) -> float:
    while True:
        time.sleep(3600)
