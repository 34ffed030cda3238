"""What server and client agree on beyond Flower itself: property and config keys, and how a
failed round travels back (a non-OK status whose message is JSON, since Flower drops the
metrics of a failed FitRes)."""

from __future__ import annotations

import json
from typing import Any

IDENTITY_PROPERTY = "client-id"
SERVER_ROUND = "server_round"
PARTITION_ID = "partition_id"
NUM_PARTITIONS = "num_partitions"
PROXIMAL_MU = "proximal_mu"  # what Flower's FedProx puts in each round's fit config
JOIN_NONCE = "join-nonce"  # get_properties config: the server's challenge (services.joining)
JOIN_PROOF = "join-proof"  # get_properties answer: HMAC of the nonce and identity under the join token
JOIN_REFUSED = "join-refused"  # get_properties config: the server refuses this connection, and why
SLOT_WAIT_TIMEOUT = "slot_wait_timeout"  # seconds a job may wait for its worker slot this round (services.budget)


TRACEBACK_CHARS = 4000  # the end of a worker's traceback that travels with its failure (the frames nearest the error)


def encode_failure(cause: str, kind: str, traceback: str = "", **details: Any) -> str:
    """A failed job as the client reports it: ``kind`` (services.failures.Kind's value) and ``cause``
    always, the end of the traceback when there is one, and whatever ``details`` (pids)."""
    trace = {"traceback": traceback[-TRACEBACK_CHARS:]} if traceback else {}
    return json.dumps({"cause": cause, "kind": kind, **trace, **details}, sort_keys=True)


def decode_failure(message: str) -> dict[str, Any]:
    try:
        decoded = json.loads(message)
    except (TypeError, ValueError):
        return {"cause": message or "client reported failure without a reason"}
    return decoded if isinstance(decoded, dict) and "cause" in decoded else {"cause": message}


def scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """Flower metrics carry only scalars: a task's list or dict metric (per-class accuracy...)
    travels as its JSON text."""
    return {key: value if isinstance(value, (bool, int, float, str, bytes)) else json.dumps(value) for key, value in metrics.items()}
