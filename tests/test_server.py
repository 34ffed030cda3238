"""The server's Flower glue without a network: asking clients for identities, a failed evaluation."""

from __future__ import annotations

import time

import numpy as np
from flwr.common import Code, GetPropertiesRes, Status, ndarrays_to_parameters

from services import protocol, worker
from services.failures import Kind
from services.server.connected import ConnectedClients
from services.server.results import RoundRecorder, RunFolder
from services.server.strategy import BouquetStrategy
from services.settings import ServerSettings


class FakeProxy:
    def __init__(self, cid: str, identity: str, on_ask=None) -> None:
        self.cid, self.identity, self.on_ask = cid, identity, on_ask

    def get_properties(self, ins, timeout, group_id):
        if self.on_ask is not None:
            self.on_ask()
        if self.identity is None:
            raise ConnectionError("stream closed")
        return GetPropertiesRes(Status(Code.OK, ""), {protocol.IDENTITY_PROPERTY: self.identity})


class LiveClientManager:
    """Like Flower's SimpleClientManager: all() returns the live dictionary, which other threads change."""

    def __init__(self, proxies) -> None:
        self.clients = {p.cid: p for p in proxies}

    def all(self):
        return self.clients


def test_clients_connecting_and_leaving_while_identities_are_asked_are_not_fatal():
    """Issue 9: a client connecting while the server asked another for its identity raised
    'dictionary changed size during iteration' and killed the server before round 1."""
    manager = LiveClientManager([])

    def churn():
        n = len(manager.clients)
        manager.clients[f"new-{n}"] = FakeProxy(f"new-{n}", f"joiner-{n}")  # arrives meanwhile
        manager.clients.pop("gone", None)  # leaves meanwhile

    manager.clients.update({
        "a": FakeProxy("a", "r1", on_ask=churn),
        "gone": FakeProxy("gone", None),
        "b": FakeProxy("b", "r2", on_ask=churn),
    })
    clients = ConnectedClients(manager)
    first = clients.snapshot()
    assert first == {"a": "r1", "b": "r2"}  # "gone" vanished while asked: skipped, not fatal
    second = clients.snapshot()  # the joiners are seen on the next look
    assert {"r1", "r2"} < set(second.values()) and any(v.startswith("joiner-") for v in second.values())


def test_each_connection_is_asked_its_identity_once():
    asked = []
    manager = LiveClientManager([FakeProxy("a", "r1", on_ask=lambda: asked.append("a"))])
    clients = ConnectedClients(manager)
    for _ in range(3):
        assert clients.identities() == {"r1"}
    assert asked == ["a"]


class FailingEvaluator:
    def evaluate(self, weights):
        raise worker.WorkerFailed("out of GPU memory (OutOfMemoryError: CUDA out of memory)", 4242, kind=Kind.OUT_OF_MEMORY)


def test_failed_central_evaluation_is_recorded_and_the_run_goes_on(tmp_path):
    folder = RunFolder(tmp_path, "run")
    recorder = RoundRecorder(folder)
    settings = ServerSettings(fraction_fit=1.0, min_fit_clients=1, min_clients=1, client_eval=False, seed=0, strategy="fedavg", strategy_args={})
    strategy = BouquetStrategy(
        spec=None, settings=settings, membership=None, clients=None, recorder=recorder, evaluator=FailingEvaluator()
    )
    recorder.round_started(1)
    assert strategy.evaluate(1, ndarrays_to_parameters([np.zeros(2)])) is None
    record = recorder.round_ended()
    recorder.commit(record)
    assert record["accuracy"] is None and "out of GPU memory" in record["evaluation_error"]
    assert record["evaluation_error_kind"] == "out of memory"
    assert folder.metrics_path.read_text().count("\n") == 1


def test_sampling_depends_on_the_round_alone_so_a_resumed_run_samples_as_the_uninterrupted_one():
    """fraction_fit < 1: a restarted server must not start the sampling stream again (it would
    pick round 1's clients for round 3 after a restart at round 3)."""
    from services.server.sampling import sample_for_round
    from services.server.membership import Holder

    holders = [Holder(f"cid{p}", f"id{p}", p) for p in range(10)]
    picks = {r: [h.partition for h in sample_for_round(holders, 3, seed=7, server_round=r)] for r in range(1, 9)}
    assert all(len(p) == 3 and p == sorted(p) for p in picks.values())
    # the same round after a restart: same picks, whatever order the clients reconnected in
    assert [h.partition for h in sample_for_round(list(reversed(holders)), 3, seed=7, server_round=5)] == picks[5]
    assert len({tuple(p) for p in picks.values()}) > 1, "every round picked the same clients"


def test_a_client_silent_past_its_job_budget_is_recorded_as_timed_out(tmp_path):
    """The server's round deadline is the job budget (services.budget); a sampled client that sent
    nothing back by then is recorded as timed out after it, one that vanished earlier as lost."""
    from services.budget import JobBudget
    from services.server.membership import Membership
    from services.server.registry import PartitionRegistry
    from services.taskspec import TaskSpec

    registry = PartitionRegistry()
    registry.settle(2)
    folder = RunFolder(tmp_path, "run")
    recorder = RoundRecorder(folder)
    settings = ServerSettings(fraction_fit=1.0, min_fit_clients=1, min_clients=1, client_eval=False, seed=0, strategy="fedavg", strategy_args={})
    strategy = BouquetStrategy(
        spec=TaskSpec(worker_timeout=2.0), settings=settings, membership=Membership(registry, 1, 0.0, 1.0), clients=None,
        recorder=recorder, evaluator=None,
    )
    budget = JobBudget.for_round(2.0, 2)
    assert strategy.budget() == budget and strategy._base_config(1)[protocol.SLOT_WAIT_TIMEOUT] == budget.slot_wait_s
    for started_ago, expected in [(budget.deadline_s + 1, f"timed out after {budget.deadline_s:g} s"), (1.0, "no result from client")]:
        recorder.round_started(1)
        strategy._sampled = {"c1": ("r1", 0)}
        strategy._fit_started = time.monotonic() - started_ago
        strategy.aggregate_fit(1, [], [])
        [failure] = recorder.round_ended()["failures"]
        assert failure["id"] == "r1" and failure["cause"].startswith(expected), failure
        assert failure.get("kind") == ("timed out" if expected.startswith("timed") else None)
        assert strategy.every_connection_lost == (not expected.startswith("timed"))  # a timed-out round is not run again
    # Lost mid-round (a host going down): Flower's errors name no client; each lost one's cause
    # says the connection went, with the round's errors once each.
    recorder.round_started(2)
    strategy._sampled = {"c1": ("r1", 0), "c2": ("r2", 1)}
    strategy._fit_started = time.monotonic()
    strategy.aggregate_fit(2, [], [ConnectionResetError(), ConnectionResetError()])
    causes = {failure["cause"] for failure in recorder.round_ended()["failures"]}
    assert causes == {"no result from client: its connection was lost before it answered (its process, container or host went away; ConnectionResetError x2)"}
