"""Every Flower call the server makes: the gRPC server, the strategy and the round hooks.

FedAvg does the aggregation (weighted by each client's number of training examples). On top
of it this module settles how many clients form the federation, gives each its partition,
records every round, evaluates centrally through ``CentralEvaluator`` and keeps client-side
evaluation off unless asked (a final evaluate-on-all-clients round can overflow the GPU).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Server, ServerConfig, start_server
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from services import protocol, worker
from services.server.central import CentralEvaluator
from services.server.registry import PartitionRegistry
from services.server.results import RoundRecorder, RunFolder
from services.taskspec import TaskSpec

log = logging.getLogger("bouquet.server")

IDENTITY_TIMEOUT_S = 30.0


class Membership:
    """Settles the federation's size once, then maps connected clients to partitions."""

    def __init__(self, registry: PartitionRegistry, min_clients: int, join_grace: float, poll_s: float = 0.2) -> None:
        self.registry = registry
        self.min_clients = min_clients
        self.join_grace = join_grace
        self.poll_s = poll_s
        self._identity_by_cid: dict[str, str] = {}

    def settle(self, client_manager: ClientManager) -> int:
        """Wait for FL_MIN_CLIENTS, then admit clients until none joined for FL_JOIN_GRACE seconds.

        Clients are counted by identity, not by connection: a replica restarted during the
        grace (its old stream not closed yet) is one client, and one that left is not counted."""
        while True:
            log.info("waiting for %d clients (FL_MIN_CLIENTS)", self.min_clients)
            while not client_manager.wait_for(self.min_clients, timeout=60):
                log.info("still waiting: %d of %d clients connected", client_manager.num_available(), self.min_clients)
            count, quiet_since = self._distinct_clients(client_manager), time.monotonic()
            while time.monotonic() - quiet_since < self.join_grace:
                time.sleep(self.poll_s)
                now = self._distinct_clients(client_manager)
                if now != count:
                    count, quiet_since = now, time.monotonic()
            if count >= self.min_clients:
                break
            log.info("only %d distinct clients after the grace period; waiting again", count)
        self.registry.settle(count)
        log.info(
            "settled on %d clients: %d required (FL_MIN_CLIENTS), then no client joined or left for %.1f s (FL_JOIN_GRACE)",
            count,
            self.min_clients,
            self.join_grace,
        )
        return count

    def _distinct_clients(self, client_manager: ClientManager) -> int:
        identities = {self._identity_of(proxy) for proxy in client_manager.all().values()}
        return len(identities - {None})

    def holders(self, client_manager: ClientManager) -> list[tuple[ClientProxy, str, int]]:
        """(proxy, identity, partition) of each connected client that holds a partition.

        Clients are visited in registration order, so partitions go out in order of first
        contact. When an identity is connected twice (a restarted client whose old stream
        has not closed yet), its newest connection wins.
        """
        connected = client_manager.all()
        for stale in set(self._identity_by_cid) - set(connected):
            del self._identity_by_cid[stale]
        newest: dict[str, ClientProxy] = {}
        for cid, proxy in connected.items():
            identity = self._identity_of(proxy)
            if identity is not None and self.registry.assign(identity) is not None:
                newest[identity] = proxy
        return sorted(
            ((proxy, identity, self.registry.partition_of(identity)) for identity, proxy in newest.items()),
            key=lambda holder: holder[2],
        )

    def _identity_of(self, proxy: ClientProxy) -> str | None:
        if proxy.cid not in self._identity_by_cid:
            try:
                reply = proxy.get_properties(GetPropertiesIns(config={}), timeout=IDENTITY_TIMEOUT_S, group_id=None)
            except Exception as error:  # a client that vanished while we asked
                log.warning("could not ask connection %s for its identity: %s", proxy.cid, error)
                return None
            identity = reply.properties.get(protocol.IDENTITY_PROPERTY)
            if reply.status.code != Code.OK or not isinstance(identity, str):
                log.warning("connection %s did not report a %r property; ignoring it", proxy.cid, protocol.IDENTITY_PROPERTY)
                return None
            self._identity_by_cid[proxy.cid] = identity
        return self._identity_by_cid[proxy.cid]


class BouquetStrategy(FedAvg):
    def __init__(
        self,
        *,
        spec: TaskSpec,
        settings: Any,
        membership: Membership,
        recorder: RoundRecorder,
        evaluator: CentralEvaluator,
    ) -> None:
        super().__init__(
            fraction_fit=settings.fraction_fit,
            fraction_evaluate=1.0,
            min_fit_clients=settings.min_fit_clients,
            min_evaluate_clients=1,
            min_available_clients=settings.min_clients,
            accept_failures=True,
        )
        self.spec = spec
        self.client_eval = settings.client_eval
        self.membership = membership
        self.recorder = recorder
        self.evaluator = evaluator
        self._rng = random.Random(settings.seed)
        self._sampled: dict[str, tuple[str, int]] = {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The seeded initial model, built in a worker once the port is already open."""
        return ndarrays_to_parameters(self.evaluator.initial_weights())

    # -- training -------------------------------------------------------------------------

    def _base_config(self, server_round: int) -> dict[str, Scalar]:
        return {
            **self.spec.to_config(),
            protocol.SERVER_ROUND: server_round,
            protocol.NUM_PARTITIONS: self.membership.registry.num_partitions or 0,
        }

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.recorder.round_started(server_round)
        if self.membership.registry.num_partitions is None:
            self.membership.settle(client_manager)
        holders = self.membership.holders(client_manager)
        wanted = min(len(holders), max(int(len(holders) * self.fraction_fit), self.min_fit_clients))
        chosen = sorted(self._rng.sample(holders, wanted), key=lambda holder: holder[2])
        self._sampled = {proxy.cid: (identity, partition) for proxy, identity, partition in chosen}
        base = self._base_config(server_round)
        log.info("round %d: training on %d of %d partition holders", server_round, len(chosen), len(holders))
        return [(proxy, FitIns(parameters, {**base, protocol.PARTITION_ID: partition})) for proxy, _, partition in chosen]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        clients, failed, answered = [], [], set()
        for proxy, res in results:
            answered.add(proxy.cid)
            identity, partition = self._sampled.get(proxy.cid, (None, None))
            clients.append({"id": identity, "partition": partition, "num_examples": res.num_examples, **dict(res.metrics)})
        errors = []
        for failure in failures:
            if isinstance(failure, BaseException):
                errors.append(f"{type(failure).__name__}: {failure}")
                continue
            proxy, res = failure
            answered.add(proxy.cid)
            identity, partition = self._sampled.get(proxy.cid, (None, None))
            failed.append({"id": identity, "partition": partition, **protocol.decode_failure(res.status.message)})
        for cid, (identity, partition) in self._sampled.items():
            if cid not in answered:  # lost connection or round timeout: Flower reports these without a client
                cause = "; ".join(errors) or "no reply"
                failed.append({"id": identity, "partition": partition, "cause": f"no result from client ({cause})"})
        for failure in failed:
            log.warning("round %d: client %s (partition %s) failed: %s", server_round, failure["id"], failure["partition"], failure["cause"])
        self.recorder.fit_finished(clients, failed, self.membership.registry.num_partitions or 0)
        if not results:
            log.warning("round %d: no client returned weights; the global model stays as it was", server_round)
            return None, {}
        started = time.perf_counter()
        aggregated = super().aggregate_fit(server_round, results, failures)
        self.recorder.aggregated(time.perf_counter() - started)
        return aggregated

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        try:
            loss, accuracy = self.evaluator.evaluate(parameters_to_ndarrays(parameters))
        except worker.WorkerFailed as failure:  # the round's record says why; training goes on
            log.error("round %d: central evaluation worker (pid %s) failed: %s", server_round, failure.pid, failure.cause)
            self.recorder.central_failed(server_round, failure.cause)
            return None
        if server_round == 0:
            self.recorder.initial_evaluation(loss, accuracy)
        else:
            self.recorder.central_evaluated(loss, accuracy)
        log.info("round %d: server-side accuracy %.4f, loss %.4f", server_round, accuracy, loss)
        return loss, {"accuracy": accuracy}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if not self.client_eval:
            return []
        base = self._base_config(server_round)
        holders = self.membership.holders(client_manager)
        return [(proxy, EvaluateIns(parameters, {**base, protocol.PARTITION_ID: partition})) for proxy, _, partition in holders]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        loss, _ = super().aggregate_evaluate(server_round, results, failures)
        examples = sum(res.num_examples for _, res in results)
        accuracy = (
            sum(float(res.metrics.get("accuracy", 0.0)) * res.num_examples for _, res in results) / examples if examples else None
        )
        self.recorder.federated_evaluated(loss, accuracy, len(results))
        return loss, ({"accuracy": accuracy} if accuracy is not None else {})


class RecordingServer(Server):
    """Flower's server loop, closing each round's record once its evaluations are done."""

    def __init__(self, *, strategy: BouquetStrategy, folder: RunFolder) -> None:
        super().__init__(client_manager=SimpleClientManager(), strategy=strategy)
        self.folder = folder
        self.recorder = strategy.recorder

    def evaluate_round(self, server_round: int, timeout: float | None):  # type: ignore[override]
        outcome = super().evaluate_round(server_round, timeout)
        self.folder.save_checkpoint(server_round, parameters_to_ndarrays(self.parameters))
        record = self.recorder.round_ended()
        log.info(
            "round %d done in %.2f s: accuracy %s, %d ok, %d failed",
            server_round,
            record["round_seconds"],
            "n/a" if record["accuracy"] is None else f"{record['accuracy']:.4f}",
            record["clients_ok"],
            record["clients_failed"],
        )
        return outcome


def run(settings: Any, spec: TaskSpec, folder: RunFolder, recorder: RoundRecorder, evaluator: CentralEvaluator, registry: PartitionRegistry) -> None:
    """Serve all rounds; returns when the last one is recorded."""
    membership = Membership(registry, settings.min_clients, settings.join_grace)
    strategy = BouquetStrategy(
        spec=spec,
        settings=settings,
        membership=membership,
        recorder=recorder,
        evaluator=evaluator,
    )
    start_server(
        server_address=settings.listen_address,
        server=RecordingServer(strategy=strategy, folder=folder),
        # A client always answers within its worker timeout; the margin covers start-up and transfer.
        config=ServerConfig(num_rounds=settings.rounds, round_timeout=settings.worker_timeout + 120),
    )
