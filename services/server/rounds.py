"""The server's round loop (a Flower ``Server`` whose ``fit`` runs every round Bouquet's way):
where a round starts, is trained (again, when every connection was lost), evaluated, checkpointed
and recorded, and where a fatal error ends the run for every client."""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.common import parameters_to_ndarrays
from flwr.server import History, Server
from flwr.server.client_manager import ClientManager

from services.heap import release_freed_memory
from services.server.results import RunState
from services.server.strategy import BouquetStrategy

log = logging.getLogger("bouquet.server")

LOST_ROUND_RETRIES = 3  # attempts of one round that may end with every client's connection lost


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
