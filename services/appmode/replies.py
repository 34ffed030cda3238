"""Every ClientApp reply checked before the ServerApp sees it, whatever the ServerApp is.

Flower's strategies average what the nodes send back: a NaN array poisons the model, a wrong
shape or a missing array ends the ServerApp in the middle of its arithmetic, a `num-examples`
of 0 divides by zero. So the ServerApp's process (``serverapp``) remembers what each message
it sent carried, and holds every reply to task mode's rules (``services.updates``): each
ArrayRecord of the reply is one the message carried, with the same array names, shapes and
dtypes, all finite (a train reply brings back every ArrayRecord it was sent); `num-examples`,
where a MetricRecord has it, a positive integer; metrics finite. A reply that fails reaches the
ServerApp as a failed reply (a Message carrying an Error: Flower's strategies count it among
the failures) and is recorded with its reason. With FL_MAX_UPDATE_NORM, a reply's arrays that
moved farther than that from those sent (L2 over the floating-point arrays, all its
ArrayRecords together) are clipped to it, as in task mode, and recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, RecordDict
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode

from services import updates

REFUSED = "Bouquet refused this reply"  # the start of the Error's reason the ServerApp sees


@dataclass(frozen=True)
class SentRecord:
    """One ArrayRecord a message carried: its arrays' layout, and the arrays themselves when
    replies are clipped (the ServerApp's own record, shared by the messages of a round)."""

    layout: dict[str, updates.ArrayLayout]
    record: ArrayRecord | None


@dataclass(frozen=True)
class Sent:
    message_type: str
    records: dict[str, SentRecord]


class ReplyChecks:
    """What was sent, by message id, until its reply comes; each reply checked against it.
    ``note`` receives one dict per refused or measured reply (for the run's records)."""

    def __init__(self, max_update_norm: float | None, note: Callable[[dict[str, Any]], None]) -> None:
        self.max_update_norm = max_update_norm
        self.note = note
        self.pending: dict[str, Sent] = {}

    def sent(self, messages: Iterable[Message], message_ids: Iterable[str | None]) -> None:
        """Remember the ArrayRecords of the messages the Grid pushed (an id of None: not pushed)."""
        seen: dict[int, SentRecord] = {}  # a strategy sends one RecordDict to every node
        for message, message_id in zip(messages, message_ids):
            if message_id is None or message.has_error():
                continue
            records = {}
            for name, record in message.content.array_records.items():
                if id(record) not in seen:
                    seen[id(record)] = SentRecord({key: _layout(array) for key, array in record.items()}, record if self.max_update_norm else None)
                records[name] = seen[id(record)]
            self.pending[message_id] = Sent(message.metadata.message_type, records)

    def forget(self, message_id: str) -> None:
        """A message whose reply will not be checked (given up on: ``services.appmode.absences``)."""
        self.pending.pop(message_id, None)

    def checked(self, reply: Message) -> Message:
        """The reply as the ServerApp may see it: unchanged, clipped, or an error reply saying why."""
        sent = self.pending.pop(reply.metadata.reply_to_message_id, None)
        if reply.has_error():
            return reply
        arrays, problem = problem_of(sent, reply.content)
        if problem is not None:
            self._note(reply, sent, refused=problem)
            return make_message(metadata=reply.metadata, error=Error(code=ErrorCode.UNKNOWN, reason=f"{REFUSED}: {problem}"))
        if self.max_update_norm is None or sent is None or not arrays:
            return reply
        return self._clipped(reply, sent, arrays)

    def _clipped(self, reply: Message, sent: Sent, arrays: dict[str, dict[str, np.ndarray]]) -> Message:
        """FL_MAX_UPDATE_NORM over all the reply's arrays together, as one update."""
        limit = float(self.max_update_norm or 0.0)
        places = [(name, key) for name in arrays for key in sent.records[name].layout]
        reference = [sent.records[name].record[key].numpy() for name, key in places]  # type: ignore[index]
        kept, norm = updates.clip_update(reference, [arrays[name][key] for name, key in places], limit)
        if norm <= limit:
            self._note(reply, sent, update_norm=round(norm, 6))
            return reply
        self._note(reply, sent, update_norm=round(limit, 6), clipped_from_norm=round(norm, 6))
        content = RecordDict(dict(reply.content.items()))
        for name in arrays:
            content[name] = ArrayRecord({key: Array(kept[places.index((name, key))]) for key in sent.records[name].layout})
        return make_message(metadata=reply.metadata, content=content)

    def _note(self, reply: Message, sent: Sent | None, **what: Any) -> None:
        meta = reply.metadata
        self.note({"message_id": meta.reply_to_message_id, "flwr_node_id": meta.src_node_id, "flwr_run_id": meta.run_id, "group_id": meta.group_id,
                   "message_type": meta.message_type if sent is None else sent.message_type, "checked_at": round(time.time(), 4), **what})


def problem_of(sent: Sent | None, content: RecordDict) -> tuple[dict[str, dict[str, np.ndarray]], str | None]:
    """The reply's arrays (by ArrayRecord, then name) and why it must not reach the ServerApp, or None.
    A reply to no message this process sent (``sent`` None) has no layout to meet: its arrays
    must still be readable and finite."""
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for name, record in content.array_records.items():
        if sent is not None and name not in sent.records:
            return arrays, f"ArrayRecord {name!r} was not sent"
        read: dict[str, np.ndarray] = {}
        for key, array in record.items():
            try:
                read[key] = array.numpy()  # never unpickled: Flower loads with allow_pickle=False
            except Exception as error:
                return arrays, f"ArrayRecord {name!r}, array {key!r}: unreadable ({type(error).__name__}: {error})"
        problem = updates.keyed_problem(sent.records[name].layout, read) if sent is not None else _unsent_problem(read)
        if problem is not None:
            return arrays, f"ArrayRecord {name!r}: {problem}"
        arrays[name] = read
    if sent is not None and sent.message_type == MessageType.TRAIN:
        missing = [name for name in sent.records if name not in arrays]
        if missing:
            return arrays, f"ArrayRecord {missing[0]!r} was sent for training and not returned"
    for name, metrics in content.metric_records.items():
        problem = updates.examples_problem(metrics["num-examples"], "num-examples") if "num-examples" in metrics else None
        problem = problem or updates.metrics_problem(dict(metrics))
        if problem is not None:
            return arrays, f"MetricRecord {name!r}: {problem}"
    return arrays, None


def _unsent_problem(arrays: dict[str, np.ndarray]) -> str | None:
    return next((problem for key, array in arrays.items() if (problem := updates.finite_problem(f"array {key!r}", array))), None)


def _layout(array: Array) -> updates.ArrayLayout:
    """An array's layout as the ServerApp made it (its own Array: the declared fields are true)."""
    return updates.ArrayLayout(tuple(array.shape), np.dtype(array.dtype))
