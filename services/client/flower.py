"""Every Flower call the client makes: the Client implementation and start_client.

``fit`` and ``evaluate`` each run ONE worker (services.worker). When the worker fails the
client answers with a non-OK status carrying the cause, so the server records a failed
round for this client, and stays connected for the next round.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from flwr.client import Client, start_client
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from services import joining, protocol, worker
from services.admission import config as admission_config, retry
from services.admission.gate import Admission
from services.failures import Kind
from services.taskspec import Placement, TaskSpec

log = logging.getLogger("bouquet.client")


class WorkerClient(Client):
    def __init__(
        self, identity: str, placement: Placement, start_method: str, admission: Admission | None = None, join_token: str | None = None,
        host: str | None = None,
    ) -> None:
        """``admission``: how workers are admitted to slots (``admission.config.worker_admission``;
        each job gets its need key); None runs workers without admission. ``join_token``: the
        secret this client proves when the server asks (services.joining). ``host``: the machine
        this replica runs on (FL_HOST_NAME), sent with every training's metrics when set."""
        self.identity = identity
        self.host = host
        self.placement = placement
        self.start_method = start_method
        self.admission = admission
        self.join_token = join_token
        self.refused: str | None = None  # why the server refused this client, once it said so

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        """The identity, and the proof of the join token when the server sends a nonce. The
        server also uses this message to say that it refuses the client, and why."""
        refused = ins.config.get(protocol.JOIN_REFUSED)
        if isinstance(refused, str):
            self.refused = refused
            return GetPropertiesRes(status=Status(Code.OK, ""), properties={})
        properties: dict[str, Any] = {protocol.IDENTITY_PROPERTY: self.identity}
        nonce = ins.config.get(protocol.JOIN_NONCE)
        if isinstance(nonce, str) and self.join_token is not None:
            properties[protocol.JOIN_PROOF] = joining.proof(self.join_token, nonce, self.identity)
        return GetPropertiesRes(status=Status(Code.OK, ""), properties=properties)

    def fit(self, ins: FitIns) -> FitRes:
        result = self._run("services.task:train", ins, with_round=True)
        if isinstance(result, str):
            return FitRes(status=Status(Code.FIT_NOT_IMPLEMENTED, result), parameters=Parameters([], ""), num_examples=0, metrics={})
        result, retried = result
        trained = result.value
        metrics = {
            **trained["metrics"],
            "client_pid": os.getpid(),
            "worker_start_seconds": round(result.start_seconds, 4),
            "worker_seconds": round(result.total_seconds, 4),
            **admission_metrics(result, retried),
            **({"host": self.host} if self.host else {}),
        }
        log.info(
            "round %s: partition %s trained on %d examples in worker pid %d (%.2f s, start %.2f s), loss %.4f",
            ins.config.get(protocol.SERVER_ROUND), ins.config.get(protocol.PARTITION_ID), trained["num_examples"],
            result.pid, result.total_seconds, result.start_seconds, metrics["train_loss"],
        )
        return FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(trained["weights"]), num_examples=trained["num_examples"], metrics=metrics)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        result = self._run("services.task:evaluate", ins, with_round=False)
        if isinstance(result, str):
            return EvaluateRes(status=Status(Code.EVALUATE_NOT_IMPLEMENTED, result), loss=0.0, num_examples=0, metrics={})
        result, retried = result
        scored = result.value
        return EvaluateRes(
            status=Status(Code.OK, ""),
            loss=float(scored["loss"]),
            num_examples=scored["num_examples"],
            metrics={**protocol.scalars(scored["metrics"]), **scored["job"], "client_pid": os.getpid(), **admission_metrics(result, retried)},
        )

    def _run(self, job: str, ins: FitIns | EvaluateIns, with_round: bool) -> tuple[worker.WorkerResult, bool] | str:
        """The worker's result, or the failure message (JSON) to send back instead of one.

        Flower's legacy gRPC client crashes its process on an exception, so everything that can
        go wrong in a round (a config this client cannot read, a failed worker) must become a
        non-OK status here: the round fails, the client stays."""
        server_round = ins.config.get(protocol.SERVER_ROUND)
        try:
            spec, partition, num_partitions, server_round = self._read_config(ins.config)
            inputs = {"spec": spec, "placement": self.placement, "weights": parameters_to_ndarrays(ins.parameters),
                      "partition_id": partition, "num_partitions": num_partitions}
            if with_round:
                inputs["server_round"] = server_round
                if protocol.PROXIMAL_MU in ins.config:  # FedProx's term, for the task's train()
                    inputs["proximal_mu"] = float(ins.config[protocol.PROXIMAL_MU])
        except (KeyError, TypeError, ValueError) as problem:
            log.error("round %s: unreadable round config: %s: %s", server_round, type(problem).__name__, problem)
            cause = f"unreadable round config: {type(problem).__name__}: {problem}"
            return protocol.encode_failure(cause, kind=Kind.START_FAILED.value, client_pid=os.getpid())
        admission = admission_config.for_job(self.admission, job, spec) if self.admission is not None else None
        wait = float(ins.config.get(protocol.SLOT_WAIT_TIMEOUT, spec.worker_timeout))  # this round's, from the server (services.budget)
        try:
            return retry.run(job, inputs, timeout=spec.worker_timeout, start_method=self.start_method, admission=admission, wait_timeout=wait)
        except worker.WorkerFailed as failure:
            log.error("round %s: %s worker (pid %s) failed (%s): %s", server_round, job.partition(":")[2], failure.pid, failure.kind, failure.cause)
            if failure.traceback:
                log.error("round %s: the worker's traceback:\n%s", server_round, failure.traceback.rstrip())
            return protocol.encode_failure(**failure.record(), client_pid=os.getpid())

    @staticmethod
    def _read_config(config: dict[str, Any]) -> tuple[TaskSpec, int, int, int]:
        return (
            TaskSpec.from_config(config),
            int(config[protocol.PARTITION_ID]),
            int(config[protocol.NUM_PARTITIONS]),
            int(config[protocol.SERVER_ROUND]),
        )


def admission_metrics(result: worker.WorkerResult, retried: bool) -> dict[str, Any]:
    """Where the worker ran and how long it waited for its slot (metrics.jsonl, per client)."""
    admitted = result.admitted or {}
    keep = ("device", "slots", "slot_wait_seconds", "worker_started_at", "worker_ended_at")
    return {**{key: admitted[key] for key in keep if admitted.get(key) is not None}, "retried_after_oom": retried}


def run(server_address: str, client: WorkerClient, reconnect_timeout: float, ca: bytes | None) -> None:
    """Serve the server's rounds until it says the run is over (over TLS when ``ca`` is given)."""
    start_client(
        server_address=server_address, client=client, insecure=ca is None, root_certificates=ca, max_wait_time=reconnect_timeout
    )


def describe_loss(problem: Exception) -> str:
    """One line for a broken connection (gRPC's exceptions print whole debug strings)."""
    code = getattr(problem, "code", None)
    details = getattr(problem, "details", None)
    if callable(code) and callable(details):
        return f"gRPC {code().name}: {details()}"
    return f"{type(problem).__name__}: {str(problem).splitlines()[0] if str(problem) else ''}"
