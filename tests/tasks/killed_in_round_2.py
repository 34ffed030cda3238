"""The built-in task, except that one client's worker SIGKILLs itself in that client's second
training (round 2, as every client trains every round): what the kernel's OOM killer does to a
worker, at a moment the test knows instead of one a polling thread must catch
(tests/test_federation.py).

``BOUQUET_TEST_VICTIM`` names the client (its FL_CLIENT_ID, which its workers inherit) and
``BOUQUET_TEST_RECORDS`` a folder where each of the victim's trainings leaves a mark and the
worker that kills itself its pid (``killed.pid``). Without them: the built-in task, unchanged.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from services.builtin_task import Net, configure, load_centralized_dataset, load_data, test  # noqa: F401
from services.builtin_task import train as builtin_train

KILLED_IN_TRAINING = 2


def train(net, trainloader, epochs, lr, device, proximal_mu: float = 0.0) -> float:
    victim, records = os.environ.get("BOUQUET_TEST_VICTIM"), os.environ.get("BOUQUET_TEST_RECORDS")
    if victim and records and os.environ.get("FL_CLIENT_ID") == victim:
        folder = Path(records)
        training = len(list(folder.glob("training-*"))) + 1  # one client: its trainings never overlap
        (folder / f"training-{training}").touch()
        if training == KILLED_IN_TRAINING:
            (folder / "killed.pid").write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
    return builtin_train(net, trainloader, epochs, lr, device, proximal_mu=proximal_mu)
