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


def encode_failure(cause: str, **details: Any) -> str:
    return json.dumps({"cause": cause, **details}, sort_keys=True)


def decode_failure(message: str) -> dict[str, Any]:
    try:
        decoded = json.loads(message)
    except (TypeError, ValueError):
        return {"cause": message or "client reported failure without a reason"}
    return decoded if isinstance(decoded, dict) and "cause" in decoded else {"cause": message}
