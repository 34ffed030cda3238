"""Many light Flower clients in one process, for the settling stress test (tests/test_settling.py).

    python tests/swarm.py SERVER DATA_DIR stable ID:DELAY ...   announce every ID on the data
        folder at once, connect each after its DELAY seconds, answer every round
    python tests/swarm.py SERVER DATA_DIR churn ID ...          connect every ID at once, print
        "asked" once the server has asked all of them for their identity, then wait to be killed
    python tests/swarm.py SERVER DATA_DIR silent N               open N of Flower's streams, print
        "asked" once the server's first message reached every one, never answer, wait to be killed

A real client trains in a worker; these answer fit with the weights they got, which is all the
server's settling and bookkeeping need. Each client is a thread running Flower's start_client.
"""

from __future__ import annotations

import sys
import threading
import time

from flwr.client import Client, start_client
from flwr.common import Code, FitIns, FitRes, GetPropertiesIns, GetPropertiesRes, Status

from services import protocol, roster


class EchoClient(Client):
    def __init__(self, identity: str, asked: threading.Barrier | None) -> None:
        self.identity, self.asked = identity, asked

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        if self.asked is not None:
            threading.Thread(target=self.asked.wait, daemon=True).start()
            self.asked = None
        return GetPropertiesRes(Status(Code.OK, ""), {protocol.IDENTITY_PROPERTY: self.identity})

    def fit(self, ins: FitIns) -> FitRes:
        return FitRes(Status(Code.OK, ""), ins.parameters, num_examples=1, metrics={"train_loss": 0.0})


def serve(server: str, identity: str, delay: float, asked: threading.Barrier | None = None) -> None:
    time.sleep(delay)  # part of the scenario: replicas that connect seconds apart
    start_client(server_address=server, client=EchoClient(identity, asked), insecure=True, max_wait_time=60)


def stay_silent(server: str, asked: threading.Barrier) -> None:
    """Join Flower's stream, read the server's first message (its identity question) and never
    answer: what a stuck or hostile client looks like to the server."""
    import grpc
    from flwr.proto.transport_pb2_grpc import FlowerServiceStub

    never = threading.Event()

    def nothing():
        never.wait()
        yield from ()

    channel = grpc.insecure_channel(server)
    stream = FlowerServiceStub(channel).Join(nothing())
    next(stream)
    asked.wait()
    never.wait()


def main(server: str, data_dir: str, mode: str, *members: str) -> None:
    threads = []
    if mode == "silent":
        count = int(members[0])
        asked = threading.Barrier(count + 1, action=lambda: print("asked", flush=True))
        for _ in range(count):
            threading.Thread(target=stay_silent, args=(server, asked), daemon=True).start()
        asked.wait()
        threading.Event().wait()
    if mode == "stable":
        schedule = [(member.split(":")[0], float(member.split(":")[1])) for member in members]
        held = [roster.announce(data_dir, identity) for identity, _ in schedule]
        assert all(held), "could not announce"
        print("announced", flush=True)
        threads = [threading.Thread(target=serve, args=(server, identity, delay)) for identity, delay in schedule]
    else:
        asked = threading.Barrier(len(members) + 1, action=lambda: print("asked", flush=True))
        threads = [threading.Thread(target=serve, args=(server, identity, 0.0, asked), daemon=True) for identity in members]
        threading.Thread(target=asked.wait, daemon=True).start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main(*sys.argv[1:])
