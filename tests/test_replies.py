"""App mode's reply checks (services/appmode/replies.py) on Flower 1.42's own Messages: each
ClientApp reply against what its message carried, a refused one turned into an error reply that
Flower's unchanged FedAvg counts as a failure, FL_MAX_UPDATE_NORM clipping as in task mode, and
the checks put between the ServerApp and flwr's HttpGrid (services/appmode/serverapp.py)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import HttpGrid

from services.appmode import serverapp
from services.appmode.absences import Absences, Replicas
from services.appmode.records import MessageLog, node_file
from services.appmode.replies import REFUSED, ReplyChecks
from services.budget import JobBudget


@pytest.fixture(autouse=True)
def in_a_serverapp(monkeypatch):
    """Flower's Message takes its run and node from the process's task identity, as flwr-serverapp sets it."""
    for name, value in (("_run_id", 3), ("_node_id", 1), ("_task_id", 4)):
        monkeypatch.setattr(TaskIdentity, name, value)


def model(**changed: np.ndarray) -> dict[str, np.ndarray]:
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32), "steps": np.array(7, np.int64)}
    return {**arrays, **changed}


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


class Checked:
    """A ReplyChecks with its notes kept, and instruction messages pushed through it."""

    def __init__(self, max_update_norm: float | None = None) -> None:
        self.notes: list[dict] = []
        self.checks = ReplyChecks(max_update_norm, self.notes.append)

    def send(self, message_type: str = MessageType.TRAIN, node: int = 5, content: RecordDict | None = None) -> Message:
        content = content or RecordDict({"arrays": record(model()), "config": ConfigRecord({"lr": 0.1})})
        message = Message(content, node, message_type)
        message.metadata.__dict__["_message_id"] = message.object_id  # as the Grid does when it pushes
        self.checks.sent([message], [message.metadata.message_id])
        return message


def reply(to: Message, arrays: dict[str, np.ndarray] | None = None, num_examples: object = 10, **metrics: object) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": num_examples, **metrics})})
    if arrays is not None:
        content["arrays"] = record(arrays)
    return Message(content, reply_to=to)


def refusal(checked: Checked, answer: Message) -> str | None:
    """Why the checks refused ``answer`` (also in its note), or None when it passed unchanged."""
    out = checked.checks.checked(answer)
    if not out.has_error():
        assert out is answer
        return None
    assert out.error.reason.startswith(f"{REFUSED}: ")
    assert out.metadata.reply_to_message_id == answer.metadata.reply_to_message_id and out.metadata.src_node_id == answer.metadata.src_node_id
    assert checked.notes[-1]["refused"] == out.error.reason.removeprefix(f"{REFUSED}: ")
    return checked.notes[-1]["refused"]


def test_an_honest_train_reply_passes_unchanged_and_is_not_noted():
    checked = Checked()
    assert refusal(checked, reply(checked.send(), model(w=np.ones((2, 3), np.float32)), train_loss=0.5)) is None
    assert checked.notes == [] and checked.checks.pending == {}  # forgotten once answered


@pytest.mark.parametrize("arrays, num_examples, metrics, reason", [
    (model(w=np.array([[np.nan, 1, 2], [3, np.inf, 5]], np.float32)), 10, {}, "ArrayRecord 'arrays': array 'w': 2 of 6 values are not finite (NaN/Inf)"),
    (model(b=np.zeros(4, np.float32)), 10, {}, "ArrayRecord 'arrays': array 'b': shape (4,), expected (3,)"),
    (model(b=np.zeros(3, np.float64)), 10, {}, "ArrayRecord 'arrays': array 'b': dtype float64, expected float32"),
    ({**model(), "extra": np.zeros(1, np.float32)}, 10, {}, "ArrayRecord 'arrays': arrays not sent 'extra'"),
    ({"w": model()["w"], "steps": model()["steps"]}, 10, {}, "ArrayRecord 'arrays': arrays missing 'b'"),
    ({"w": model()["w"], "b2": model()["b"], "steps": model()["steps"]}, 10, {}, "ArrayRecord 'arrays': arrays missing 'b'; not sent 'b2'"),
    (model(), 0, {}, "MetricRecord 'metrics': num-examples 0, expected a positive integer"),
    (model(), -3, {}, "MetricRecord 'metrics': num-examples -3, expected a positive integer"),
    (model(), 2.5, {}, "MetricRecord 'metrics': num-examples 2.5 is not an integer"),
    (model(), 10, {"train_loss": float("nan")}, "MetricRecord 'metrics': metric 'train_loss' is nan"),
    (model(), 10, {"losses": [0.1, float("inf")]}, "MetricRecord 'metrics': metric 'losses' is [0.1, inf]"),
    (None, 10, {}, "ArrayRecord 'arrays' was sent for training and not returned"),
])
def test_a_bad_train_reply_is_refused_with_its_reason(arrays, num_examples, metrics, reason):
    checked = Checked()
    assert refusal(checked, reply(checked.send(), arrays, num_examples, **metrics)) == reason
    note = checked.notes[-1]
    assert note["flwr_node_id"] == 5 and note["message_type"] == "train" and note["message_id"]


def test_an_arrayrecord_the_message_did_not_carry_is_refused():
    checked = Checked()
    answer = reply(checked.send(), model())
    answer.content["smuggled"] = record({"x": np.zeros(2, np.float32)})
    assert refusal(checked, answer) == "ArrayRecord 'smuggled' was not sent"


def test_an_array_whose_bytes_are_no_numpy_array_is_refused():
    checked = Checked()
    answer = reply(checked.send(), model())
    answer.content["arrays"]["w"] = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"not an npy file")
    assert refusal(checked, answer).startswith("ArrayRecord 'arrays', array 'w': unreadable (")


def test_an_evaluate_reply_needs_no_arrays_but_its_metrics_are_checked():
    checked = Checked()
    assert refusal(checked, reply(checked.send(MessageType.EVALUATE), None, 20, eval_acc=0.5)) is None
    assert refusal(checked, reply(checked.send(MessageType.EVALUATE), None, 0)) == "MetricRecord 'metrics': num-examples 0, expected a positive integer"


def test_an_error_reply_passes_as_it_is():
    checked = Checked()
    message = checked.send()
    from flwr.app import Error

    failed = Message(Error(code=2, reason="the node's data cannot be read"), reply_to=message)
    assert checked.checks.checked(failed) is failed and checked.checks.pending == {} and checked.notes == []


def test_a_reply_to_a_message_this_process_did_not_send_must_still_be_finite():
    checked = Checked()
    stranger = Message(RecordDict({"arrays": record(model())}), 9, MessageType.TRAIN)
    stranger.metadata.__dict__["_message_id"] = stranger.object_id
    assert refusal(checked, reply(stranger, {"anything": np.ones(2)})) is None
    assert refusal(checked, reply(stranger, {"anything": np.array([np.nan])})) == "ArrayRecord 'arrays': array 'anything': 1 of 1 values are not finite (NaN)"


def test_fedavg_unchanged_counts_a_refused_reply_as_a_failure_and_averages_only_the_others():
    checked = Checked()
    honest, poisoned = checked.send(node=1), checked.send(node=2)
    replies = [checked.checks.checked(reply(honest, model(w=np.ones((2, 3), np.float32)), 10)),
               checked.checks.checked(reply(poisoned, model(w=np.full((2, 3), np.nan, np.float32)), 1000))]
    arrays, _ = FedAvg().aggregate_train(1, replies)
    assert np.array_equal(arrays["w"].numpy(), np.ones((2, 3), np.float32))
    assert all(np.isfinite(array.numpy()).all() for array in arrays.values())


def test_a_reply_farther_than_fl_max_update_norm_is_clipped_to_it_and_noted():
    checked = Checked(max_update_norm=1.0)
    near = model(w=model()["w"] + np.float32(0.1))
    assert refusal(checked, reply(checked.send(), near)) is None
    assert checked.notes[-1]["update_norm"] == pytest.approx(np.sqrt(6 * 0.01), rel=1e-5) and "clipped_from_norm" not in checked.notes[-1]
    far = model(w=model()["w"] + np.float32(3.0), steps=np.array(9, np.int64))
    out = checked.checks.checked(reply(checked.send(), far, 10, train_loss=0.25))
    assert not out.has_error()
    note = checked.notes[-1]
    assert note["update_norm"] == 1.0 and note["clipped_from_norm"] == pytest.approx(np.sqrt(6 * 9.0), rel=1e-5)
    clipped = {key: array.numpy() for key, array in out.content["arrays"].items()}
    assert np.linalg.norm(clipped["w"] - model()["w"]) == pytest.approx(1.0, rel=1e-5) and clipped["w"].dtype == np.float32
    assert clipped["steps"] == 9  # integer buffers count steps, not distance: kept as sent back
    assert out.content["metrics"]["train_loss"] == 0.25 and out.metadata.reply_to_message_id == note["message_id"]


def through_a_fake_superlink(monkeypatch, answer) -> None:
    """HttpGrid's push and pull stand in for the SuperLink: ``answer`` gives a sent message's
    reply, or None (none yet). flwr's own send_and_receive is restored after the test."""
    outbox: list[Message] = []

    def push(self, messages):
        outbox.extend(messages)
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
        return [message.metadata.message_id for message in messages]

    def pull(self, message_ids):
        return [answered for message in outbox if message.metadata.message_id in message_ids and (answered := answer(message)) is not None]

    monkeypatch.setattr(HttpGrid, "push_messages", push)
    monkeypatch.setattr(HttpGrid, "pull_messages", pull)
    monkeypatch.setattr(HttpGrid, "send_and_receive", HttpGrid.send_and_receive)


def test_the_serverapp_process_puts_the_checks_between_httpgrid_and_the_serverapp(monkeypatch, tmp_path):
    """flwr's HttpGrid, its send_and_receive Bouquet's, every reply checked."""
    through_a_fake_superlink(monkeypatch, lambda message: reply(message, model(w=np.full((2, 3), np.nan, np.float32)) if message.metadata.dst_node_id == 2 else model()))
    notes: list[dict] = []
    serverapp.install(ReplyChecks(None, notes.append), Absences(JobBudget.for_round(10.0, 2), Replicas(tmp_path, live=set)), notes.append)
    content = RecordDict({"arrays": record(model()), "config": ConfigRecord({"lr": 0.1})})
    replies = list(HttpGrid(token="t").send_and_receive([Message(content, node, MessageType.TRAIN) for node in (1, 2)], timeout=10))
    assert [(r.metadata.src_node_id, r.has_error()) for r in replies] == [(1, False), (2, True)]
    assert [note["flwr_node_id"] for note in notes] == [2] and "not finite" in notes[0]["refused"]


def test_the_serverapp_stops_waiting_for_a_stopped_replica_and_the_round_goes_on(monkeypatch, tmp_path):
    """Node 3's replica (known from its records) stopped: its message gets an error reply at once,
    which Flower's FedAvg counts among the round's failures, and the give-up is noted with the cause."""
    through_a_fake_superlink(monkeypatch, lambda message: reply(message, model()) if message.metadata.dst_node_id == 1 else None)
    MessageLog(node_file(tmp_path, "client-b")).append({"node": "client-b", "flwr_node_id": 3, "outcome": "ok"})
    notes: list[dict] = []
    serverapp.install(ReplyChecks(None, notes.append), Absences(JobBudget.for_round(10.0, 2), Replicas(tmp_path, live=lambda: {"client-a"})), notes.append)
    content = RecordDict({"arrays": record(model()), "config": ConfigRecord({"lr": 0.1})})
    replies = list(HttpGrid(token="t").send_and_receive([Message(content, node, MessageType.TRAIN) for node in (1, 3)], timeout=60))
    assert [(r.metadata.src_node_id, r.has_error()) for r in replies] == [(1, False), (3, True)]
    assert replies[1].error.reason.startswith(serverapp.GIVEN_UP) and "replica client-b stopped" in replies[1].error.reason
    assert [(note["flwr_node_id"], "client-b stopped" in note["no_reply"]) for note in notes] == [(3, True)]
