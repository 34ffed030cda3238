"""The built-in task, except that every client's trainings after its third wait for a file: every
replica is inside its fourth training (round 4, as every client trains every round) when a test
acts, e.g. stops a Docker host, at a moment the test knows instead of one a poll might miss
(tests/test_swarm.py).

``BOUQUET_TEST_GATE`` names a folder every replica sees (on every host): each training leaves a
mark ``<hostname>-training-<k>`` there (the hostname is the replica's identity, kept when it is
rescheduled), and a training with k > 3 waits until ``open`` exists in it. Without the variable:
the built-in task, unchanged.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from services.builtin_task import Net, configure, load_centralized_dataset, load_data, test  # noqa: F401
from services.builtin_task import train as builtin_train

FREE_TRAININGS = 3
POLL_S = 0.1


def train(net, trainloader, epochs, lr, device, proximal_mu: float = 0.0) -> float:
    gate = os.environ.get("BOUQUET_TEST_GATE")
    if gate:
        folder, me = Path(gate), socket.gethostname()
        training = len(list(folder.glob(f"{me}-training-*"))) + 1  # one replica: its trainings never overlap
        (folder / f"{me}-training-{training}").touch()
        while training > FREE_TRAININGS and not (folder / "open").exists():
            time.sleep(POLL_S)  # a worker's own wait, bounded by FL_WORKER_TIMEOUT
    return builtin_train(net, trainloader, epochs, lr, device, proximal_mu=proximal_mu)
