"""A client that speaks Flower's protocol like a Bouquet client but answers badly, one way per
``--case`` (tests/test_hostile_clients.py runs several at once against a real server):

  shape, dtype, count, nan, inf, zero-examples, negative-examples, nan-metric: a broken update
  no-token:      no proof of the join token
  wrong-token:   a proof made with another token
  dropper:       opens Flower's stream and drops it, again and again, never answering

No torch and no worker: it answers from the weights the server sent. With ``--record`` it
appends one line per fit to that file, so the test knows each case was asked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import grpc
import numpy as np
from flwr.client import Client, start_client
from flwr.common import Code, FitIns, FitRes, GetPropertiesIns, GetPropertiesRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from services import joining, protocol

UPDATE_CASES = ("shape", "dtype", "count", "nan", "inf", "zero-examples", "negative-examples", "nan-metric")
JOIN_CASES = ("no-token", "wrong-token")


def broken(case: str, weights: list[np.ndarray]) -> tuple[list[np.ndarray], int, dict]:
    """The update this case returns for the global model ``weights``."""
    weights = [array.copy() for array in weights]
    examples, metrics = 100, {"train_loss": 0.5}
    if case == "shape":
        weights[0] = np.concatenate([weights[0], weights[0][:1]])  # one row too many
    elif case == "dtype":
        weights = [array.astype(np.float64) for array in weights]
    elif case == "count":
        weights = weights[:-1]
    elif case == "nan":
        weights[0].flat[0] = np.nan
    elif case == "inf":
        weights[-1].flat[-1] = np.inf
    elif case == "zero-examples":
        examples = 0
    elif case == "negative-examples":
        examples = -5
    elif case == "nan-metric":
        metrics = {"train_loss": float("nan")}
    return weights, examples, metrics


class HostileClient(Client):
    def __init__(self, identity: str, case: str, token: str | None, record: str | None) -> None:
        self.identity, self.case, self.token, self.record = identity, case, token, record

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        properties = {protocol.IDENTITY_PROPERTY: self.identity}
        nonce = ins.config.get(protocol.JOIN_NONCE)
        if isinstance(nonce, str) and self.case != "no-token":
            token = "a-wrong-token-of-enough-length" if self.case == "wrong-token" else self.token
            if token is not None:
                properties[protocol.JOIN_PROOF] = joining.proof(token, nonce, self.identity)
        return GetPropertiesRes(status=Status(Code.OK, ""), properties=properties)

    def fit(self, ins: FitIns) -> FitRes:
        weights, examples, metrics = broken(self.case, parameters_to_ndarrays(ins.parameters))
        if self.record:
            with open(self.record, "a") as out:
                out.write(json.dumps({"id": self.identity, "case": self.case, "round": ins.config.get(protocol.SERVER_ROUND)}) + "\n")
        return FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(weights), num_examples=examples, metrics=metrics)


def drop_repeatedly(address: str, times: int, record: str | None) -> None:
    """Join Flower's stream, read the server's first message (or give up after a moment) and
    hang up, ``times`` times."""
    from flwr.proto.transport_pb2_grpc import FlowerServiceStub

    for attempt in range(times):
        with grpc.insecure_channel(address) as channel:
            stream = FlowerServiceStub(channel).Join(iter(()), timeout=1.0)
            try:
                next(stream)
            except (grpc.RpcError, StopIteration):
                pass
            stream.cancel()
        if record:
            with open(record, "a") as out:
                out.write(json.dumps({"case": "dropper", "attempt": attempt}) + "\n")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True, choices=(*UPDATE_CASES, *JOIN_CASES, "dropper"))
    parser.add_argument("--server", required=True)
    parser.add_argument("--id", default=None)
    parser.add_argument("--record", default=None)
    parser.add_argument("--times", type=int, default=20)
    args = parser.parse_args()
    if args.case == "dropper":
        drop_repeatedly(args.server, args.times, args.record)
        return 0
    token = os.environ.get("FL_JOIN_TOKEN")
    start_client(server_address=args.server, client=HostileClient(args.id or f"hostile-{args.case}", args.case, token, args.record), insecure=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
