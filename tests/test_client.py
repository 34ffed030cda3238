"""The client turns every worker failure into a failed round for the server, and stays up.

The tests that start real workers (each imports torch in a fresh process) or a client process
are marked ``integration``: they are left out of the fast subset."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from flwr.common import Code, FitIns, GetPropertiesIns, ndarrays_to_parameters, parameters_to_ndarrays

from conftest import PYTHON, REPO
from services import protocol, task
from services.client.flower import WorkerClient
from services.taskspec import Placement, TaskSpec

HANGS_IN_TRAIN = REPO / "tests" / "tasks" / "hangs_in_train.py"  # its train never returns


def fit_ins(spec: TaskSpec, partition: int = 0, num_partitions: int = 3) -> FitIns:
    weights = task.initial_weights(spec)
    config = {**spec.to_config(), protocol.PARTITION_ID: partition, protocol.NUM_PARTITIONS: num_partitions, protocol.SERVER_ROUND: 1}
    return FitIns(ndarrays_to_parameters(weights), config)


def digits_spec(**changes) -> TaskSpec:
    values = dict(dataset="digits", model="digits-cnn", local_epochs=1, batch_size=16, learning_rate=0.05,
                  partitioning="iid", dirichlet_alpha=0.5, seed=0, synthetic_samples=100, worker_timeout=120.0)
    return TaskSpec(**{**values, **changes})


def test_client_reports_its_identity(data_dir):
    client = WorkerClient("replica-7", Placement(str(data_dir), "cpu"), "spawn")
    assert client.get_properties(GetPropertiesIns({})).properties == {protocol.IDENTITY_PROPERTY: "replica-7"}


@pytest.mark.integration
def test_fit_trains_in_a_worker_and_counts_examples(data_dir):
    client = WorkerClient("c", Placement(str(data_dir), "cpu"), "spawn")
    res = client.fit(fit_ins(digits_spec()))
    assert res.status.code == Code.OK
    assert res.num_examples == 479  # a third of digits' 1437 training EXAMPLES, not batches
    assert res.metrics["worker_pid"] != os.getpid() == res.metrics["client_pid"]
    assert [a.shape for a in parameters_to_ndarrays(res.parameters)] == [a.shape for a in task.initial_weights(digits_spec())]


@pytest.mark.integration
@pytest.mark.parametrize(
    "spec, partition, kind, cause",
    [
        (digits_spec(), 5, "task error", "ValueError: partition_id 5 outside 0..2"),  # the worker raises
        (digits_spec(task=str(HANGS_IN_TRAIN), worker_timeout=0.2), 0, "timed out", "timed out after 0.2 s"),  # only the timeout ends it
    ],
)
def test_failed_worker_fails_the_round_not_the_client(data_dir, spec, partition, kind, cause):
    client = WorkerClient("c", Placement(str(data_dir), "cpu"), "spawn")
    res = client.fit(fit_ins(spec, partition=partition))
    assert res.status.code != Code.OK
    failure = json.loads(res.status.message)  # what the server records in the round's failures
    assert failure["kind"] == kind and cause in failure["cause"] and failure["client_pid"] == os.getpid()
    assert ("Traceback (most recent call last)" in failure.get("traceback", "")) == (kind == "task error")
    # The same client object serves the next round normally.
    assert client.fit(fit_ins(digits_spec())).status.code == Code.OK


@pytest.mark.integration
def test_client_gives_up_clearly_when_no_server_answers():
    done = subprocess.run(
        [PYTHON, "-m", "services.client", "--server-address", "127.0.0.1:9", "--connect-timeout", "1.5"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert "not reachable within 1.5 s (FL_CONNECT_TIMEOUT)" in done.stderr


@pytest.mark.integration
def test_client_process_never_imports_torch(data_dir):
    """A whole fit, through the real client class, leaves torch out of the client's process."""
    script = (
        "import sys\n"
        "from flwr.common import FitIns, ndarrays_to_parameters\n"
        "from services.client.flower import WorkerClient\n"
        "from services.taskspec import Placement, TaskSpec\n"
        "from services import protocol, worker\n"
        "spec = TaskSpec(dataset='digits', model='digits-cnn', local_epochs=1, batch_size=16, synthetic_samples=100, worker_timeout=120.0)\n"
        "weights = worker.run('services.task:initial_weights', {'spec': spec}, timeout=120).value\n"
        "config = {**spec.to_config(), protocol.PARTITION_ID: 0, protocol.NUM_PARTITIONS: 2, protocol.SERVER_ROUND: 1}\n"
        f"client = WorkerClient('c', Placement({str(data_dir)!r}, 'cpu'), 'spawn')\n"
        "res = client.fit(FitIns(ndarrays_to_parameters(weights), config))\n"
        "print(res.status.code.name, res.num_examples, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["OK", "719", "False"]


def test_unreadable_round_config_fails_the_round_not_the_client(data_dir):
    client = WorkerClient("c", Placement(str(data_dir), "cpu"), "spawn")
    good = fit_ins(digits_spec())
    broken = FitIns(good.parameters, {k: v for k, v in good.config.items() if k != "dataset"})
    res = client.fit(broken)
    assert res.status.code != Code.OK
    assert "unreadable round config" in json.loads(res.status.message)["cause"]


def test_identity_is_the_hostname_by_default_and_client_id_wins(tmp_path):
    import socket

    from services.client.identity import identity

    assert identity(None, "hostname", tmp_path) == socket.gethostname()
    assert identity("site-b-7", "container", tmp_path) == "site-b-7"
    assert list(tmp_path.iterdir()) == []


def test_container_identity_is_kept_in_the_container_and_differs_between_containers(tmp_path):
    """Replicas that share a hostname (network_mode: host) get distinct identities; one replica
    keeps its identity across restarts (the file lives in its own filesystem)."""
    import socket

    from services.client.identity import identity

    first, second = tmp_path / "container-1", tmp_path / "container-2"
    first.mkdir(), second.mkdir()
    one = identity(None, "container", first)
    assert one.startswith(socket.gethostname() + "-") and len(one) == len(socket.gethostname()) + 13
    assert identity(None, "container", first) == one  # a restart of the same container
    assert identity(None, "container", second) != one
    assert sorted(p.name for p in first.iterdir()) == [".bouquet-identity"]
