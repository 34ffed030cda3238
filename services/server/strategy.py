"""Bouquet's Flower strategy: the duties of a round around whichever Flower strategy aggregates
(FL_STRATEGY, built by ``strategies``; FedAvg weighs by each client's number of training
examples). It waits for the partition holders and samples them (``sampling``), configures their
training, has their answers vetted (``fit_answers``) before the Flower strategy aggregates,
records every step (``results.RoundRecorder``), evaluates centrally through ``CentralEvaluator``
and keeps client-side evaluation off unless asked (a final evaluate-on-all-clients round can
overflow the GPU)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from services import protocol, updates, worker
from services.budget import JobBudget
from services.server import strategies
from services.server.central import CentralEvaluator
from services.server.connected import ConnectedClients
from services.server.fit_answers import cap_examples, sort_answers, vet_update
from services.server.membership import Membership
from services.server.results import RoundRecorder
from services.server.sampling import ChosenClients, sample_for_round, wait_for_holders
from services.settings import ServerSettings
from services.taskspec import TaskSpec

log = logging.getLogger("bouquet.server")


class BouquetStrategy(Strategy):
    """Bouquet's duties around whichever Flower strategy aggregates (FL_STRATEGY): who trains and
    on which partition, the round records, the central evaluation in workers, the client-eval
    switch. The Flower strategy is built once the initial model exists (the adaptive ones keep
    it), and asked only to configure and aggregate."""

    def __init__(
        self,
        *,
        spec: TaskSpec,
        settings: ServerSettings,
        membership: Membership,
        clients: ConnectedClients,
        recorder: RoundRecorder,
        evaluator: CentralEvaluator,
        central_evaluation: bool = True,
        resume_from: list[np.ndarray] | None = None,
    ) -> None:
        self.spec = spec
        self.resume_from = resume_from
        self.strategy_name, self.strategy_args = settings.strategy, settings.strategy_args
        self.fraction_fit, self.min_fit_clients = settings.fraction_fit, settings.min_fit_clients
        self.central_evaluation = central_evaluation
        self.client_eval = settings.client_eval or not central_evaluation
        self.membership = membership
        self.clients = clients
        self.recorder = recorder
        self.evaluator = evaluator
        self.inner: Strategy | None = None
        self.seed = settings.seed
        self._sampled: dict[str, tuple[str, int]] = {}
        self._fit_started = time.monotonic()  # when the clients of this round were asked to train
        self.every_connection_lost = False  # in the last round's training: nobody answered at all
        self.max_update_norm = settings.max_update_norm
        self.layout: updates.Layout = []
        self._global_parameters: Parameters | None = None  # this round's global model
        self._global_weights: list[np.ndarray] | None = None  # the same as arrays, when updates are clipped

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The seeded initial model, built in a worker once the port is already open (or a resumed
        run's last checkpoint); the Flower strategy starts from it."""
        weights = self.resume_from if self.resume_from is not None else self.evaluator.initial_weights()
        initial = ndarrays_to_parameters(weights)
        self.layout = updates.layout_of(weights)  # every update and aggregate is checked against it
        self.inner = strategies.build(self.strategy_name, self.strategy_args, initial)
        self._global_parameters = initial
        return initial

    # -- training -------------------------------------------------------------------------

    def budget(self) -> JobBudget:
        """Each client job's time this run (services.budget): at most one job per partition per round."""
        return JobBudget.for_round(self.spec.worker_timeout, self.membership.registry.num_partitions or 1)

    def _base_config(self, server_round: int) -> dict[str, Scalar]:
        return {
            **self.spec.to_config(),
            protocol.SERVER_ROUND: server_round,
            protocol.NUM_PARTITIONS: self.membership.registry.num_partitions or 0,
            protocol.SLOT_WAIT_TIMEOUT: self.budget().slot_wait_s,
        }

    def _no_result(self, errors: str) -> dict[str, Any]:
        """A sampled client that sent nothing back: past the round's deadline it timed out (its
        job's budget is spent), before it the connection was lost."""
        budget = self.budget()
        if time.monotonic() - self._fit_started >= budget.deadline_s:
            return {"kind": "timed out", "cause": f"timed out after {budget.deadline_s:g} s (its job's time budget: {budget.describe()})"}
        return {"cause": f"no result from client: its connection was lost before it answered (its process, container or host went away; {errors})"}

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._global_parameters = parameters
        self._global_weights = parameters_to_ndarrays(parameters) if self.max_update_norm is not None else None
        holders = wait_for_holders(self.membership, self.clients, self.min_fit_clients, server_round)
        missing = self.membership.missing(holders)
        self.recorder.partitions_missing(missing)
        for gap in missing:
            log.warning("round %d: partition %d will not train: %s%s", server_round, gap["partition"], gap["reason"], f" (client {gap['id']})" if gap["id"] else "")
        wanted = min(len(holders), max(int(len(holders) * self.fraction_fit), self.min_fit_clients))
        chosen = sample_for_round(holders, wanted, self.seed, server_round)
        self._sampled = {holder.cid: (holder.identity, holder.partition) for holder in chosen}
        self._fit_started = time.monotonic()
        base = self._base_config(server_round)
        log.info("round %d: training on %d of %d partition holders", server_round, len(chosen), len(holders))
        proxies = {h.cid: self.clients.proxy(h.cid) for h in chosen}
        own_config = {proxy.cid: ins.config for proxy, ins in self.inner.configure_fit(server_round, parameters, ChosenClients(list(proxies.values())))}
        return [
            (proxies[h.cid], FitIns(parameters, {**own_config.get(h.cid, {}), **base, protocol.PARTITION_ID: h.partition}))
            for h in chosen
        ]

    def settle(self) -> None:
        """Wait for the federation (services.server.membership) before round 1, so that a round's
        time, and the memory baseline the monitor takes just before it, start with every client."""
        if self.membership.registry.num_partitions is None:
            self.membership.settle(self.clients.identities)

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[tuple[ClientProxy, FitRes] | BaseException]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Every update is checked (``fit_answers``, by services.updates) before the Flower strategy
        sees it; a failing one is left out and recorded with its reason. The strategy's result is
        checked too: no client's answer, and no arithmetic, can end the run or make the global
        model non-finite."""
        answers = sort_answers(
            results, failures, self._sampled,
            vet=lambda res: vet_update(res, self.layout, self._global_weights, self.max_update_norm), no_result=self._no_result,
        )
        self.every_connection_lost = answers.every_connection_lost
        answers.log(server_round, self.max_update_norm)
        accepted = cap_examples(server_round, answers.accepted, answers.clients)
        self.recorder.fit_finished(answers.clients, answers.failed, self.membership.registry.num_partitions or 0, rejected=answers.rejected)
        if not accepted:
            log.warning("round %d: no client returned a usable update; the global model stays as it was", server_round)
            return None, {}
        started = time.perf_counter()
        try:
            aggregated, metrics = self.inner.aggregate_fit(server_round, accepted, failures)
        except Exception as problem:  # e.g. a strategy that needs more clients than answered (krum)
            return self._refuse_aggregate(server_round, f"the {self.strategy_name} strategy failed: {type(problem).__name__}: {problem}")
        self.recorder.aggregated(time.perf_counter() - started)
        if aggregated is None:
            return self._refuse_aggregate(server_round, f"the {self.strategy_name} strategy returned no model")
        kept = updates.checked_aggregate(self.layout, parameters_to_ndarrays(aggregated))
        if isinstance(kept, str):
            return self._refuse_aggregate(server_round, kept)
        return ndarrays_to_parameters(kept), metrics

    def _refuse_aggregate(self, server_round: int, reason: str) -> tuple[None, dict[str, Scalar]]:
        """The previous global model stays (no checkpoint; the round is not trained). The Flower
        strategy is rebuilt from it, since an adaptive one (fedadam ...) would otherwise keep the
        refused model in its own state and make the same one again."""
        log.error("round %d: aggregate refused (%s); the global model stays as it was and no checkpoint is written", server_round, reason)
        self.recorder.aggregate_refused(reason)
        self.inner = strategies.build(self.strategy_name, self.strategy_args, self._global_parameters)
        return None, {}

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        if not self.central_evaluation:  # the task has no held-out data: the clients evaluate
            return None
        try:
            loss, metrics = self.evaluator.evaluate(parameters_to_ndarrays(parameters))
        except worker.WorkerFailed as failure:  # the round's record says why; training goes on
            log.error("round %d: central evaluation worker (pid %s) failed (%s): %s", server_round, failure.pid, failure.kind, failure.cause)
            self.recorder.central_failed(server_round, failure.cause, failure.kind.value)
            return None
        if server_round == 0:
            self.recorder.initial_evaluation(loss, metrics)
        else:
            self.recorder.central_evaluated(loss, metrics)
        log.info("round %d: server-side accuracy %.4f, loss %.4f", server_round, metrics["accuracy"], loss)
        return loss, {"accuracy": metrics["accuracy"]}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if not self.client_eval:
            return []
        base = self._base_config(server_round)
        holders = self.membership.hand_out_partitions(self.clients.snapshot())
        return [(self.clients.proxy(h.cid), EvaluateIns(parameters, {**base, protocol.PARTITION_ID: h.partition})) for h in holders]

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
    ) -> tuple[float | None, dict[str, Scalar]]:
        usable, rejected = [], []
        for proxy, res in results:
            problem = updates.evaluation_problem(res.loss, res.num_examples, dict(res.metrics))
            if problem is None:
                usable.append((proxy, res))
                continue
            identity = self.clients.known(proxy.cid)
            log.warning("round %d: evaluation of client %s rejected: %s", server_round, identity, problem)
            rejected.append({"id": identity, "reason": problem})
        results = usable
        loss, _ = self.inner.aggregate_evaluate(server_round, results, failures) if results else (None, {})
        examples = sum(res.num_examples for _, res in results)
        accuracy = (
            sum(float(res.metrics.get("accuracy", 0.0)) * res.num_examples for _, res in results) / examples if examples else None
        )
        self.recorder.federated_evaluated(
            loss, accuracy, len(results), len(failures), as_round_accuracy=not self.central_evaluation, rejected=rejected
        )
        return loss, ({"accuracy": accuracy} if accuracy is not None else {})

