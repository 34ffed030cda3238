"""A round's training answers made ready for aggregation, apart from the strategy so that what
rejects, clips or down-weighs an update is read in one place: every update is vetted
(``services.updates``; clipped to FL_MAX_UPDATE_NORM when set), every failure and every sampled
client that sent nothing becomes a record, and the example counts that weigh the average are capped."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from flwr.common import FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from services import protocol, updates

log = logging.getLogger("bouquet.server")

Vetted = tuple[FitRes, dict[str, Any]] | str  # the update as it may be aggregated with notes for its record, or why it may not


def vet_update(res: FitRes, layout: updates.Layout, global_weights: list[np.ndarray] | None, max_update_norm: float | None) -> Vetted:
    """The update as it may be aggregated (clipped to ``max_update_norm`` around
    ``global_weights`` when set) with notes for its record, or the reason it may not."""
    try:
        weights = parameters_to_ndarrays(res.parameters)
    except Exception as problem:  # bytes that are no numpy arrays (never unpickled: allow_pickle is off)
        return f"unreadable parameters ({type(problem).__name__}: {problem})"
    problem = updates.update_problem(layout, weights, res.num_examples, dict(res.metrics))
    if problem is not None or max_update_norm is None:
        return problem or (res, {})
    kept, norm = updates.clip_update(global_weights, weights, max_update_norm)
    if norm <= max_update_norm:
        return res, {"update_norm": round(norm, 6)}
    clipped = FitRes(status=res.status, parameters=ndarrays_to_parameters(kept), num_examples=res.num_examples, metrics=res.metrics)
    return clipped, {"update_norm": round(max_update_norm, 6), "clipped_from_norm": round(norm, 6)}


@dataclass
class FitAnswers:
    """One round's training answers, sorted: the updates that may be aggregated, and a record for
    every sampled client (``clients`` in the order of ``accepted``, then ``rejected`` and ``failed``)."""

    accepted: list[tuple[ClientProxy, FitRes]]
    clients: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    every_connection_lost: bool  # nobody answered at all and the deadline had not passed

    def log(self, server_round: int, max_update_norm: float | None) -> None:
        for failure in self.failed:
            log.warning("round %d: client %s (partition %s) failed: %s", server_round, failure["id"], failure["partition"], failure["cause"])
        for refusal in self.rejected:
            log.warning("round %d: update of client %s (partition %s) rejected: %s", server_round, refusal["id"], refusal["partition"], refusal["reason"])
        for client in self.clients:
            if "clipped_from_norm" in client:
                log.warning("round %d: update of client %s (partition %s) clipped from L2 distance %.4g to %g (FL_MAX_UPDATE_NORM)",
                            server_round, client["id"], client["partition"], client["clipped_from_norm"], max_update_norm)


def sort_answers(
    results: list[tuple[ClientProxy, FitRes]],
    failures: list[tuple[ClientProxy, FitRes] | BaseException],
    sampled: dict[str, tuple[str, int]],
    vet: Callable[[FitRes], Vetted],
    no_result: Callable[[str], dict[str, Any]],
) -> FitAnswers:
    """Flower's results and failures of a round as ``FitAnswers``. ``sampled``: {connection id:
    (identity, partition)} of the clients asked to train; ``no_result``: the record of one that
    sent nothing back, given the round's errors."""
    clients, failed, rejected, accepted, answered = [], [], [], [], set()
    for proxy, res in results:
        answered.add(proxy.cid)
        identity, partition = sampled.get(proxy.cid, (None, None))
        vetted = vet(res)
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
        identity, partition = sampled.get(proxy.cid, (None, None))
        failed.append({**protocol.decode_failure(res.status.message), "id": identity, "partition": partition})
    for cid, (identity, partition) in sampled.items():
        if cid not in answered:  # lost connection or round timeout: Flower reports these without a client
            failed.append({"id": identity, "partition": partition, **no_result(_counted(errors) or "no reply")})
    timed_out = any(failure.get("kind") == "timed out" for failure in failed)  # answered by the deadline, not lost
    return FitAnswers(accepted, clients, rejected, failed, every_connection_lost=bool(sampled) and not answered and not timed_out)


def _counted(errors: list[str]) -> str:
    """Flower's errors of a round, each once with how often it came (``GrpcBridgeClosed: x3``):
    they name no client, so every lost client's record carries the round's list."""
    counts: dict[str, int] = {}
    for error in errors:
        counts[error] = counts.get(error, 0) + 1
    return "; ".join(error if count == 1 else f"{error} x{count}" for error, count in counts.items())


def cap_examples(server_round: int, accepted: list[tuple[ClientProxy, FitRes]], clients: list[dict[str, Any]]) -> list[tuple[ClientProxy, FitRes]]:
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
