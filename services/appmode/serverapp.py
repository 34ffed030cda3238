"""``python -P -m services.appmode.serverapp``: Flower's own ``flwr-serverapp``, every ClientApp reply checked.

Bouquet's ``flwr-serverapp`` (``serverapp_shim``) execs this in the run's folder. It puts
``replies.ReplyChecks`` between the ServerApp and the SuperLink, in this process only (flwr
stays as installed): flwr 1.42's ``flwr-serverapp`` gives every ServerApp an ``HttpGrid``
(``flwr.superlink.runtime.run_serverapp``), whose ``push_messages`` and ``pull_messages`` every
way of sending and receiving goes through (``send_and_receive`` calls both). So any ServerApp,
unchanged, gets checked replies. Then flwr's ``flwr_serverapp()`` runs with the same arguments.
Each refused or measured reply is appended to ``<run folder>/reply-checks.jsonl`` (submit
merges it into messages.jsonl) and logged in the ServerApp's log (``flwr-run.log``).
A message that will never be answered (``absences``: its replica stopped, or the job's time
budget passed) gets an error reply from here, so the round goes on without it, and is recorded
the same way, as is every error reply Flower itself makes; each round's start is noted as it
happens (``RoundStarts``). ``send_and_receive`` asks for
replies every 0.5 s instead of Flower's 3 s: a round ends when its last reply comes.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Iterable

from flwr.app import Error, Message, Metadata
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.superlink.cli import flwr_serverapp
from flwr.superlink.grid import HttpGrid
from flwr.supercore import log

from services import roster
from services.appmode import assignment
from services.appmode.evaluations import ROUND
from services.appmode.absences import Absences, Replicas
from services.appmode.replies import ReplyChecks
from services.appmode.serverapp_shim import DATA_DIR_VARIABLE, MAX_NORM_VARIABLE, RUN_FOLDER_VARIABLE, WORKER_TIMEOUT_VARIABLE
from services.budget import JobBudget
from services.files import REPLY_CHECKS, ROUND_STARTS, append_json_line

PULL_EVERY_S = 0.5  # Flower's send_and_receive sleeps 3 s between pulls
GIVEN_UP = "Bouquet stopped waiting for this reply"  # the start of the Error's reason the ServerApp sees


class ChecksFile:
    """``reply-checks.jsonl``: one line per refused or measured reply, appended whole."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, line: dict[str, Any]) -> None:
        if "refused" in line:
            log(WARNING, "Bouquet refused the %s reply of node %s: %s", line["message_type"], line["flwr_node_id"], line["refused"])
        elif "no_reply" in line:
            log(WARNING, "Bouquet stopped waiting for the %s reply of node %s: %s", line["message_type"], line["flwr_node_id"], line["no_reply"])
        elif "clipped_from_norm" in line:
            log(INFO, "Bouquet clipped the %s reply of node %s from L2 distance %.4g to %g (FL_MAX_UPDATE_NORM)",
                line["message_type"], line["flwr_node_id"], line["clipped_from_norm"], line["update_norm"])
        append_json_line(self.path, line)


class RoundStarts(logging.Handler):
    """Flower's strategies log "[ROUND k/N]" as each round starts: noted at that moment, with the
    replicas running then (``services.roster``), in ``round-starts.jsonl`` (submit's rounds)."""

    def __init__(self, path: Path, data_dir: str) -> None:
        super().__init__(level=INFO)
        self.path = path
        self.data_dir = data_dir

    def emit(self, record: logging.LogRecord) -> None:
        found = ROUND.search(record.getMessage())
        if found is None:
            return
        append_json_line(self.path, {"round": int(found.group(1)), "rounds": int(found.group(2)), "at": round(time.time(), 4), "running": sorted(roster.live(self.data_dir))})


def install(checks: ReplyChecks, absences: Absences, note: ChecksFile) -> None:
    """Wrap HttpGrid's push, pull and send_and_receive (in this process): every reply passes
    ``checks``; a message ``absences`` gives up on gets an error reply saying why."""
    push, pull = HttpGrid.push_messages, HttpGrid.pull_messages
    out: dict[str, Metadata] = {}  # what was sent and not answered yet, by message id

    def push_messages(self: HttpGrid, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        message_ids = list(push(self, messages))
        checks.sent(messages, message_ids)
        for message, message_id in zip(messages, message_ids):
            if message_id is not None:
                out[message_id] = message.metadata
                absences.sent(message_id, message.metadata.dst_node_id)
        return message_ids

    def pull_messages(self: HttpGrid, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        replies = []
        for reply in pull(self, message_ids):
            asked = out.pop(reply.metadata.reply_to_message_id, None)
            absences.answered(reply.metadata.reply_to_message_id)
            if reply.has_error() and asked is not None:
                note(_line(asked, reply.metadata.reply_to_message_id, error_reply=reply.error.reason, error_code=reply.error.code))
            replies.append(checks.checked(reply))
        answered = {reply.metadata.reply_to_message_id for reply in replies}
        for message_id, cause in absences.overdue(m for m in message_ids if m not in answered).items():
            checks.forget(message_id)
            asked = out.pop(message_id)
            note(_line(asked, message_id, no_reply=cause))
            replies.append(_given_up(asked, message_id, cause))
        return replies

    def send_and_receive(self: HttpGrid, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's own loop (push, then pull until every reply came or ``timeout``), polling faster."""
        waiting = {message_id for message_id in self.push_messages(messages) if message_id is not None}
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (end is None or time.monotonic() < end):
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting -= {reply.metadata.reply_to_message_id for reply in got}
            if waiting:
                time.sleep(PULL_EVERY_S)
        return replies

    HttpGrid.push_messages = push_messages  # type: ignore[method-assign]
    HttpGrid.pull_messages = pull_messages  # type: ignore[method-assign]
    HttpGrid.send_and_receive = send_and_receive  # type: ignore[method-assign]


def _line(asked: Metadata, message_id: str, **what: Any) -> dict[str, Any]:
    return {"message_id": message_id, "flwr_node_id": asked.dst_node_id, "flwr_run_id": asked.run_id, "group_id": asked.group_id,
            "message_type": asked.message_type, "sent_at": round(asked.created_at, 4), "checked_at": round(time.time(), 4), **what}


def _given_up(asked: Metadata, message_id: str, cause: str) -> Message:
    """The error reply Flower's SuperLink makes for a node that stopped, made here for ``cause``."""
    metadata = Metadata(run_id=asked.run_id, message_id="", src_node_id=asked.dst_node_id, dst_node_id=asked.src_node_id, reply_to_message_id=message_id,
                        group_id=asked.group_id, ttl=0.0, message_type=asked.message_type, created_at=time.time())
    return make_message(metadata=metadata, error=Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"{GIVEN_UP}: {cause}"))


def max_update_norm(text: str | None) -> float | None:
    return float(text) if text else None


def absences_from(environment: dict[str, str] | os._Environ) -> Absences:
    """The link names the data folder and FL_WORKER_TIMEOUT; the round's jobs are the settled partitions."""
    data_dir = environment[DATA_DIR_VARIABLE]
    settled = assignment.read(data_dir)
    budget = JobBudget.for_round(float(environment[WORKER_TIMEOUT_VARIABLE]), settled.num_partitions if settled is not None else 1)
    return Absences(budget, Replicas(data_dir))


def main(argv: list[str]) -> None:
    folder = Path(os.environ.get(RUN_FOLDER_VARIABLE) or os.getcwd())
    note = ChecksFile(folder / REPLY_CHECKS)
    install(ReplyChecks(max_update_norm(os.environ.get(MAX_NORM_VARIABLE)), note), absences_from(os.environ), note)
    logging.getLogger("flwr").addHandler(RoundStarts(folder / ROUND_STARTS, os.environ[DATA_DIR_VARIABLE]))
    sys.argv = ["flwr-serverapp", *argv]
    flwr_serverapp()


if __name__ == "__main__":
    main(sys.argv[1:])
