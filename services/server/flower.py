"""Every Flower call the server makes: the gRPC server, the strategy and the round hooks.

A Flower strategy does the aggregation (FL_STRATEGY, built by ``strategies``; FedAvg weighs
by each client's number of training examples). Around it this module asks each connection for its identity (for ``Membership``, which settles the
federation and hands out partitions), records every round, evaluates centrally through
``CentralEvaluator`` and keeps client-side evaluation off unless asked (a final
evaluate-on-all-clients round can overflow the GPU).
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    ReconnectIns,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import History, Server, ServerConfig, start_server
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from services import joining, protocol, tls, updates, worker
from services import settings as settings_module
from services.heap import release_freed_memory
from services.budget import JobBudget
from services.server.central import CentralEvaluator
from services.server import strategies
from services.server.membership import Holder, Membership
from services.server.results import RoundRecorder, RunState
from services.settings import ServerSettings
from services.taskspec import TaskSpec

log = logging.getLogger("bouquet.server")

IDENTITY_TIMEOUT_S = 5.0  # a new connection's answer to "who are you?" (an honest client answers in milliseconds)
MAX_UNVERIFIED = 16  # new connections asked at once; more wait for a later snapshot
REFUSAL_TIMEOUT_S = 5.0  # to tell a refused connection why and ask it to leave
SEND_OFF_THREADS = 4
HOLDERS_POLL_S = 0.5
LOST_ROUND_RETRIES = 3  # attempts of one round that may end with every client's connection lost


@dataclass
class _Question:
    """An identity question in flight: asked in a pool thread, judged by the server's thread."""

    proxy: ClientProxy
    nonce: str | None
    future: Future
    deadline: float


class ConnectedClients:
    """The connected clients and their identities, each connection asked once (get_properties).

    Flower's client manager hands out its live dictionary, which gRPC threads change as clients
    come and go; every look here works on a copy taken in one step, and a client that vanishes
    while asked is skipped, not fatal. New connections are asked at once, side by side (at most
    MAX_UNVERIFIED at a time, each for up to IDENTITY_TIMEOUT_S), so silent or ever-reconnecting
    connections hold a snapshot up for one short timeout at most, never one timeout each; one
    not answered by then is judged by a later snapshot. With a join token, the question carries
    a fresh nonce and a connection whose answer does not prove the token is refused: counted,
    dropped from the client manager, and (in the background) told why, asked to disconnect and
    closed. A connection that cannot be used (no or a bad identity, no answer) is logged once
    and not asked again."""

    def __init__(self, client_manager: ClientManager, join_token: str | None = None, on_refused: Callable[[], None] = lambda: None) -> None:
        self.client_manager = client_manager
        self.join_token = join_token
        self.on_refused = on_refused
        self._identity_by_cid: dict[str, str] = {}
        self._unusable: set[str] = set()  # connections refused or ignored: logged once, never asked again
        self._proxies: dict[str, ClientProxy] = {}
        self._asking: dict[str, _Question] = {}
        self._questions = ThreadPoolExecutor(MAX_UNVERIFIED, thread_name_prefix="bouquet-identity")
        self._send_offs = ThreadPoolExecutor(SEND_OFF_THREADS, thread_name_prefix="bouquet-refusal")

    def snapshot(self) -> dict[str, str]:
        """{connection id: identity} of the clients connected now that have told it, in order of connection."""
        proxies = list(self.client_manager.all().items())  # one C-level copy: atomic under the GIL
        current = {cid for cid, _ in proxies}
        for gone in set(self._identity_by_cid) - current:
            del self._identity_by_cid[gone]
        self._unusable &= current
        self._proxies = dict(proxies)
        for cid, proxy in proxies:
            if len(self._asking) >= MAX_UNVERIFIED:
                break  # the others are asked by a later snapshot
            if cid not in self._identity_by_cid and cid not in self._unusable and cid not in self._asking:
                self._ask(proxy)
        if self._asking:
            last = max(question.deadline for question in self._asking.values())
            wait([question.future for question in self._asking.values()], timeout=max(0.0, last - time.monotonic()))
        for cid, question in list(self._asking.items()):  # a connection gone meanwhile is judged (and logged) too
            if question.future.done():
                del self._asking[cid]
                self._judge(question)
        return {cid: self._identity_by_cid[cid] for cid, _ in proxies if cid in self._identity_by_cid}

    def identities(self) -> set[str]:
        return set(self.snapshot().values())

    def proxy(self, cid: str) -> ClientProxy:
        return self._proxies[cid]

    def known(self, cid: str) -> str | None:
        """The identity a connection reported, without asking anyone."""
        return self._identity_by_cid.get(cid)

    def close(self) -> None:
        """Questions and send-offs still queued are dropped (the run is over); running ones end by their timeouts."""
        self._questions.shutdown(wait=False, cancel_futures=True)
        self._send_offs.shutdown(wait=False, cancel_futures=True)

    def _ask(self, proxy: ClientProxy) -> None:
        nonce = joining.new_nonce() if self.join_token else None
        ins = GetPropertiesIns(config={protocol.JOIN_NONCE: nonce} if nonce else {})
        future = self._questions.submit(proxy.get_properties, ins, IDENTITY_TIMEOUT_S, None)
        # The pool never has more questions than threads, so each starts now; a second of slack for the answer's way back.
        self._asking[proxy.cid] = _Question(proxy, nonce, future, time.monotonic() + IDENTITY_TIMEOUT_S + 1.0)

    def _judge(self, question: _Question) -> None:
        proxy, nonce = question.proxy, question.nonce
        try:
            reply = question.future.result()
        except Exception as error:  # a client that vanished (or never answered) while we asked
            self._ignore(proxy, f"could not ask it for its identity ({type(error).__name__}: {error})")
            return
        properties = reply.properties if reply.status.code == Code.OK else {}
        identity = properties.get(protocol.IDENTITY_PROPERTY)
        if nonce is not None:
            answer = properties.get(protocol.JOIN_PROOF)
            if answer is None:
                self._refuse(proxy, identity, "no join secret presented (the server requires FL_JOIN_TOKEN / FL_JOIN_TOKEN_FILE)")
                return
            if not isinstance(identity, str) or not joining.verified(self.join_token, nonce, identity, answer):
                self._refuse(proxy, identity, "wrong join secret")
                return
        if not isinstance(identity, str):
            self._ignore(proxy, f"it did not report a {protocol.IDENTITY_PROPERTY!r} property")
            return
        try:
            settings_module.identifier(identity)
        except ValueError as allowed:
            self._ignore(proxy, f"its {protocol.IDENTITY_PROPERTY} {identity[:80]!r} is unusable: {allowed}")
            return
        self._identity_by_cid[proxy.cid] = identity

    def _ignore(self, proxy: ClientProxy, why: str) -> None:
        self._unusable.add(proxy.cid)
        log.warning("ignoring connection %s: %s (logged once per connection)", proxy.cid, why)

    def _refuse(self, proxy: ClientProxy, identity: object, reason: str) -> None:
        """Counted and dropped from the client manager now; told why and closed in the background."""
        self._unusable.add(proxy.cid)
        self.on_refused()
        shown = repr(identity[:80]) if isinstance(identity, str) else "none"
        log.warning("refused connection %s (client-id %s): %s", proxy.cid, shown, reason)
        self.client_manager.unregister(proxy)
        self._send_offs.submit(send_off, proxy, reason)


def send_off(proxy: ClientProxy, reason: str) -> None:
    """Tell a refused client why (a Bouquet client exits naming the setting) and ask it to
    disconnect, then close its stream whatever it did: one that kept the stream open would
    hold a server thread."""
    try:
        proxy.get_properties(GetPropertiesIns(config={protocol.JOIN_REFUSED: reason}), timeout=REFUSAL_TIMEOUT_S, group_id=None)
        proxy.reconnect(ReconnectIns(seconds=None), timeout=REFUSAL_TIMEOUT_S, group_id=None)
    except Exception:  # a client that does not play along is cut off all the same
        pass
    finally:
        bridge = getattr(proxy, "bridge", None)
        if bridge is not None:
            bridge.close()


class ChosenClients(ClientManager):
    """What a wrapped Flower strategy sees as the client manager in configure_fit: exactly the
    clients Bouquet chose. The strategy then adds its own per-round config (e.g. FedProx's
    proximal_mu) without choosing anyone itself."""

    def __init__(self, proxies: list[ClientProxy]) -> None:
        self.proxies = proxies

    def num_available(self) -> int:
        return len(self.proxies)

    def register(self, client: ClientProxy) -> bool:
        raise NotImplementedError("a fixed selection")

    def unregister(self, client: ClientProxy) -> None:
        raise NotImplementedError("a fixed selection")

    def all(self) -> dict[str, ClientProxy]:
        return {proxy.cid: proxy for proxy in self.proxies}

    def wait_for(self, num_clients: int, timeout: int) -> bool:
        return len(self.proxies) >= num_clients

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion: Any = None) -> list[ClientProxy]:
        return list(self.proxies)


def _counted(errors: list[str]) -> str:
    """Flower's errors of a round, each once with how often it came (``GrpcBridgeClosed: x3``):
    they name no client, so every lost client's record carries the round's list."""
    counts: dict[str, int] = {}
    for error in errors:
        counts[error] = counts.get(error, 0) + 1
    return "; ".join(error if count == 1 else f"{error} x{count}" for error, count in counts.items())


def sample_for_round(holders: list[Holder], wanted: int, seed: int, server_round: int) -> list[Holder]:
    """The holders that train this round, by partition. Seeded by (seed, round) rather than by
    one stream begun at start, so a resumed run samples each round as the uninterrupted run
    would have (a stream would start again and repeat its first picks)."""
    by_partition = sorted(holders, key=lambda holder: holder.partition)
    return sorted(random.Random(f"{seed}:{server_round}").sample(by_partition, wanted), key=lambda holder: holder.partition)


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
        holders = self._wait_for_holders(server_round)
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

    def _wait_for_holders(self, server_round: int) -> list[Holder]:
        """The partition holders connected now, after waiting (up to FL_JOIN_TIMEOUT) until at
        least FL_MIN_FIT_CLIENTS of them are: a replica restarting, or all of them stopping
        before the server does (`docker compose down`), must not burn rounds with nobody in them."""
        needed = min(self.min_fit_clients, self.membership.registry.num_partitions or 0)
        holders = self.membership.hand_out_partitions(self.clients.snapshot())
        if len(holders) >= needed:
            return holders
        log.warning(
            "round %d: only %d partition holder(s) connected; waiting up to %g s (FL_JOIN_TIMEOUT) for %d (FL_MIN_FIT_CLIENTS)",
            server_round, len(holders), self.membership.join_timeout, needed,
        )
        deadline = time.monotonic() + self.membership.join_timeout
        while len(holders) < needed and time.monotonic() < deadline:
            time.sleep(HOLDERS_POLL_S)
            holders = self.membership.hand_out_partitions(self.clients.snapshot())
        return holders

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Every update is checked (services.updates) before the Flower strategy sees
        it; a failing one is left out and recorded with its reason. The strategy's result is
        checked too: no client's answer, and no arithmetic, can end the run or make the global
        model non-finite."""
        clients, failed, rejected, accepted, answered = [], [], [], [], set()
        for proxy, res in results:
            answered.add(proxy.cid)
            identity, partition = self._sampled.get(proxy.cid, (None, None))
            vetted = self._vet(res)
            if isinstance(vetted, str):
                rejected.append({"id": identity, "partition": partition, "reason": vetted})
                continue
            kept, notes = vetted
            accepted.append((proxy, kept))
            clients.append({**dict(res.metrics), **notes, "id": identity, "partition": partition, "num_examples": res.num_examples})
        errors = []
        for failure in failures:
            if isinstance(failure, BaseException):
                errors.append(f"{type(failure).__name__}: {failure}" if str(failure) else type(failure).__name__)
                continue
            proxy, res = failure
            answered.add(proxy.cid)
            identity, partition = self._sampled.get(proxy.cid, (None, None))
            failed.append({**protocol.decode_failure(res.status.message), "id": identity, "partition": partition})
        for cid, (identity, partition) in self._sampled.items():
            if cid not in answered:  # lost connection or round timeout: Flower reports these without a client
                failed.append({"id": identity, "partition": partition, **self._no_result(_counted(errors) or "no reply")})
        timed_out = any(failure.get("kind") == "timed out" for failure in failed)  # answered by the deadline, not lost
        self.every_connection_lost = bool(self._sampled) and not answered and not timed_out
        for failure in failed:
            log.warning("round %d: client %s (partition %s) failed: %s", server_round, failure["id"], failure["partition"], failure["cause"])
        for refusal in rejected:
            log.warning("round %d: update of client %s (partition %s) rejected: %s", server_round, refusal["id"], refusal["partition"], refusal["reason"])
        for client in clients:
            if "clipped_from_norm" in client:
                log.warning("round %d: update of client %s (partition %s) clipped from L2 distance %.4g to %g (FL_MAX_UPDATE_NORM)",
                            server_round, client["id"], client["partition"], client["clipped_from_norm"], self.max_update_norm)
        accepted = self._cap_examples(server_round, accepted, clients)
        self.recorder.fit_finished(clients, failed, self.membership.registry.num_partitions or 0, rejected=rejected)
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

    def _cap_examples(self, server_round: int, accepted: list[tuple[ClientProxy, FitRes]], clients: list[dict[str, Any]]) -> list[tuple[ClientProxy, FitRes]]:
        """The round's updates, each weighed by at most updates.examples_cap of the claims; a
        capped client's record keeps what it claimed (``num_examples_claimed``)."""
        cap = updates.examples_cap([res.num_examples for _, res in accepted])
        if cap is None:
            return accepted
        out = []
        for (proxy, res), client in zip(accepted, clients):
            if res.num_examples > cap:
                log.warning("round %d: client %s (partition %s) claimed %d examples; weighed as %d (%d x the round's median claim)",
                            server_round, client["id"], client["partition"], res.num_examples, cap, updates.MAX_EXAMPLES_OVER_MEDIAN)
                client.update(num_examples=cap, num_examples_claimed=int(res.num_examples))
                res = FitRes(status=res.status, parameters=res.parameters, num_examples=cap, metrics=res.metrics)
            out.append((proxy, res))
        return out

    def _vet(self, res: FitRes) -> tuple[FitRes, dict[str, Any]] | str:
        """The update as it may be aggregated (clipped to FL_MAX_UPDATE_NORM when set) with notes
        for its record, or the reason it may not."""
        try:
            weights = parameters_to_ndarrays(res.parameters)
        except Exception as problem:  # bytes that are no numpy arrays (never unpickled: allow_pickle is off)
            return f"unreadable parameters ({type(problem).__name__}: {problem})"
        problem = updates.update_problem(self.layout, weights, res.num_examples, dict(res.metrics))
        if problem is not None or self.max_update_norm is None:
            return problem or (res, {})
        kept, norm = updates.clip_update(self._global_weights, weights, self.max_update_norm)
        if norm <= self.max_update_norm:
            return res, {"update_norm": round(norm, 6)}
        clipped = FitRes(status=res.status, parameters=ndarrays_to_parameters(kept), num_examples=res.num_examples, metrics=res.metrics)
        return clipped, {"update_norm": round(self.max_update_norm, 6), "clipped_from_norm": round(norm, 6)}

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
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
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


class RecordingServer(Server):
    """The run's rounds, each with its record around it: the round's life in one place (``fit``).

    A fresh run evaluates the seeded initial model first; a resumed one starts from its last
    checkpoint at the round after its last recorded one. Then the federation settles. Each round: configure and train
    (opens the record), central evaluation, client evaluation if on, then the checkpoint and
    only then the metrics line, so a recorded round always has its model on disk.

    A fatal error anywhere in the loop ends the run for everyone: the connected clients are told
    the run is over (so no replica waits on a dead server), Flower then stops its gRPC server,
    and ``run`` raises the error, so the process exits non-zero instead of idling "healthy"."""

    def __init__(self, *, client_manager: ClientManager, strategy: BouquetStrategy, state: RunState, first_round: int) -> None:
        super().__init__(client_manager=client_manager, strategy=strategy)
        self.folder = state.folder
        self.state = state
        self.first_round = first_round
        self.recorder = strategy.recorder
        self.membership = strategy.membership
        self.error: BaseException | None = None

    def fit(self, num_rounds: int, timeout: float | None) -> tuple[History, float]:  # type: ignore[override]
        """``timeout`` is unused: each round's deadline follows from the job budget (services.budget)."""
        started = time.monotonic()
        try:
            self._rounds(num_rounds)
        except Exception as error:
            self.error = error
            log.error("the run cannot go on (%s: %s); telling the clients it is over", type(error).__name__, error)
        return History(), time.monotonic() - started

    def _rounds(self, num_rounds: int) -> None:
        self.parameters = self.strategy.initialize_parameters(self._client_manager)
        if self.first_round == 1:
            self.strategy.evaluate(0, self.parameters)
            self.state.update(initial=self.recorder.initial)
        else:
            log.info("resuming at round %d of %d from the last checkpoint", self.first_round, num_rounds)
        self.strategy.settle()
        budget = self.strategy.budget()  # the partitions are settled: at most one job each per round
        log.info("each client job's time budget: %g s (%s); a round waits that long for a client's answer", budget.deadline_s, budget.describe())
        timeout = budget.deadline_s
        for server_round in range(self.first_round, num_rounds + 1):
            trained = self._train(server_round, timeout)
            self.state.update(num_partitions=self.membership.registry.num_partitions, partitions=self.membership.registry.assignments)
            if trained is not None and trained[0] is not None:
                self.parameters = trained[0]
            self.strategy.evaluate(server_round, self.parameters)
            self.evaluate_round(server_round, timeout)
            self._close(server_round)

    def _train(self, server_round: int, timeout: float | None) -> Any:
        """One round's training. When every sampled client's connection was lost mid-round (the
        replicas stopped before the server, as `docker compose down` stops them, or restart), the
        attempt is not the round: it is run again once partition holders are back (configure_fit
        waits for them, up to FL_JOIN_TIMEOUT), at most LOST_ROUND_RETRIES times. A server stopped
        meanwhile leaves the round unrecorded, so a resumed run trains it."""
        for lost in range(LOST_ROUND_RETRIES + 1):
            self.recorder.round_started(server_round, lost_attempts=lost)
            trained = self.fit_round(server_round, timeout)
            if not self.strategy.every_connection_lost or lost == LOST_ROUND_RETRIES:
                return trained
            log.warning("round %d: every client's connection was lost during training; running the round again", server_round)
        return trained

    def _close(self, server_round: int) -> None:
        record = self.recorder.round_ended()
        if record["trained"]:
            self.folder.save_checkpoint(server_round, parameters_to_ndarrays(self.parameters))
        self.recorder.commit(record)
        release_freed_memory()  # the round's updates are gone: their pages go back, not held to the next round
        log.info(
            "round %d done in %.2f s: accuracy %s, %d ok, %d failed, %d partition(s) missing%s",
            server_round,
            record["round_seconds"],
            "n/a" if record["accuracy"] is None else f"{record['accuracy']:.4f}",
            record["clients_ok"],
            record["clients_failed"],
            len(record["missing"]),
            "" if record["trained"] else "; no client trained, the global model is unchanged and no checkpoint is written",
        )


def run(
    settings: ServerSettings, spec: TaskSpec, state: RunState, recorder: RoundRecorder, evaluator: CentralEvaluator, membership: Membership,
    central_evaluation: bool, resume_from: list[np.ndarray] | None = None,
) -> None:
    """Serve the rounds after the last recorded one; returns when the last is recorded, raises
    what ended the run early."""
    client_manager = SimpleClientManager()
    clients = ConnectedClients(client_manager, settings.join_token, on_refused=recorder.join_refused)
    strategy = BouquetStrategy(
        spec=spec,
        settings=settings,
        membership=membership,
        clients=clients,
        recorder=recorder,
        evaluator=evaluator,
        central_evaluation=central_evaluation,
        resume_from=resume_from,
    )
    first_round = recorder.rounds[-1]["round"] + 1 if recorder.rounds else 1
    server = RecordingServer(client_manager=client_manager, strategy=strategy, state=state, first_round=first_round)
    try:
        start_server(
            server_address=settings.listen_address,
            server=server,
            # No fixed round timeout: RecordingServer gives every round the job budget (services.budget).
            config=ServerConfig(num_rounds=settings.rounds, round_timeout=None),
            certificates=tls.server_files(settings.tls_dir).for_flower() if settings.tls_dir else None,
        )
    finally:
        clients.close()
    if server.error is not None:
        raise server.error
