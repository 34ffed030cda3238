"""The server's Flower glue without a network: settling the federation and a failed evaluation."""

from __future__ import annotations

from types import SimpleNamespace

from flwr.common import Code, GetPropertiesRes, Status, ndarrays_to_parameters
import numpy as np

from services import protocol, worker
from services.server.flower import BouquetStrategy, Membership
from services.server.registry import PartitionRegistry
from services.server.results import RoundRecorder, RunFolder


class FakeProxy:
    def __init__(self, cid: str, identity: str) -> None:
        self.cid, self.identity = cid, identity

    def get_properties(self, ins, timeout, group_id):
        return GetPropertiesRes(Status(Code.OK, ""), {protocol.IDENTITY_PROPERTY: self.identity})


class FakeClientManager:
    def __init__(self, proxies) -> None:
        self.proxies = {p.cid: p for p in proxies}

    def wait_for(self, num_clients, timeout):
        return len(self.proxies) >= num_clients

    def num_available(self):
        return len(self.proxies)

    def all(self):
        return dict(self.proxies)


def test_settles_on_distinct_identities_not_connections():
    """A restarted replica whose old stream is still open is one client, with one partition."""
    manager = FakeClientManager([FakeProxy("a", "replica-1"), FakeProxy("b", "replica-2"), FakeProxy("c", "replica-1")])
    registry = PartitionRegistry()
    membership = Membership(registry, min_clients=2, join_grace=0.3, poll_s=0.05)
    assert membership.settle(manager) == 2
    holders = membership.holders(manager)
    assert [(proxy.cid, identity, partition) for proxy, identity, partition in holders] == [("c", "replica-1", 0), ("b", "replica-2", 1)]


def test_late_joiner_beyond_the_partitions_stays_idle():
    manager = FakeClientManager([FakeProxy("a", "r1"), FakeProxy("b", "r2")])
    membership = Membership(PartitionRegistry(), min_clients=2, join_grace=0.0)
    membership.settle(manager)
    manager.proxies["c"] = FakeProxy("c", "r3")
    assert {identity for _, identity, _ in membership.holders(manager)} == {"r1", "r2"}


class FailingEvaluator:
    def evaluate(self, weights):
        raise worker.WorkerFailed("out of GPU memory (OutOfMemoryError: CUDA out of memory)", 4242)


def test_failed_central_evaluation_is_recorded_and_the_run_goes_on(tmp_path):
    folder = RunFolder(tmp_path, "run")
    recorder = RoundRecorder(folder)
    settings = SimpleNamespace(fraction_fit=1.0, min_fit_clients=1, min_clients=1, client_eval=False, seed=0)
    strategy = BouquetStrategy(
        spec=None, settings=settings, membership=None, recorder=recorder, evaluator=FailingEvaluator()
    )
    recorder.round_started(1)
    assert strategy.evaluate(1, ndarrays_to_parameters([np.zeros(2)])) is None
    record = recorder.round_ended()
    assert record["accuracy"] is None and "out of GPU memory" in record["evaluation_error"]
    assert folder.metrics_path.read_text().count("\n") == 1
