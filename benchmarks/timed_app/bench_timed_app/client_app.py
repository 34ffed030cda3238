"""The app's own ClientApp handlers, each called unchanged, with the moment Flower handed it the
message recorded first (``handler``: the process's age then, i.e. process start -> handler)."""

from __future__ import annotations

import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from bench_timed_app import probe
from quickstart_app import client_app as original

app = ClientApp()


def _timed(handler, message_type: str, msg: Message, context: Context) -> Message:
    entered, age = time.time(), probe.process_age_seconds()
    reply = handler(msg, context)
    probe.record(
        str(context.run_config["timings-file"]), event="handler", message_type=message_type, entered_at=entered, process_age_seconds=age,
        handler_seconds=time.time() - entered, partition=int(context.node_config["partition-id"]),
        server_round=int(msg.content["config"]["server-round"]) if "config" in msg.content else None,
    )
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _timed(original.train, "train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _timed(original.evaluate, "evaluate", msg, context)
