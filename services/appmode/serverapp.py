"""``python -P -m services.appmode.serverapp``: Flower's own ``flwr-serverapp``, every ClientApp reply checked.

Bouquet's ``flwr-serverapp`` (``serverapp_shim``) execs this in the run's folder. It puts
``replies.ReplyChecks`` between the ServerApp and the SuperLink, in this process only (flwr
stays as installed): flwr 1.42's ``flwr-serverapp`` gives every ServerApp an ``HttpGrid``
(``flwr.superlink.runtime.run_serverapp``), whose ``push_messages`` and ``pull_messages`` every
way of sending and receiving goes through (``send_and_receive`` calls both). So any ServerApp,
unchanged, gets checked replies. Then flwr's ``flwr_serverapp()`` runs with the same arguments.
Each refused or measured reply is appended to ``<run folder>/reply-checks.jsonl`` (submit
merges it into messages.jsonl) and logged in the ServerApp's log (``flwr-run.log``).
"""

from __future__ import annotations

import json
import os
import sys
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Iterable

from flwr.app import Message
from flwr.superlink.cli import flwr_serverapp
from flwr.superlink.grid import HttpGrid
from flwr.supercore import log

from services.appmode.replies import ReplyChecks
from services.appmode.serverapp_shim import MAX_NORM_VARIABLE, RUN_FOLDER_VARIABLE
from services.files import REPLY_CHECKS


class ChecksFile:
    """``reply-checks.jsonl``: one line per refused or measured reply, appended whole."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, line: dict[str, Any]) -> None:
        if "refused" in line:
            log(WARNING, "Bouquet refused the %s reply of node %s: %s", line["message_type"], line["flwr_node_id"], line["refused"])
        elif "clipped_from_norm" in line:
            log(INFO, "Bouquet clipped the %s reply of node %s from L2 distance %.4g to %g (FL_MAX_UPDATE_NORM)",
                line["message_type"], line["flwr_node_id"], line["clipped_from_norm"], line["update_norm"])
        with open(self.path, "a") as out:
            out.write(json.dumps(line, sort_keys=True) + "\n")


def install(checks: ReplyChecks) -> None:
    """Wrap HttpGrid's push and pull (in this process) so that every reply passes ``checks``."""
    push, pull = HttpGrid.push_messages, HttpGrid.pull_messages

    def push_messages(self: HttpGrid, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        message_ids = list(push(self, messages))
        checks.sent(messages, message_ids)
        return message_ids

    def pull_messages(self: HttpGrid, message_ids: Iterable[str]) -> Iterable[Message]:
        return [checks.checked(reply) for reply in pull(self, message_ids)]

    HttpGrid.push_messages = push_messages  # type: ignore[method-assign]
    HttpGrid.pull_messages = pull_messages  # type: ignore[method-assign]


def max_update_norm(text: str | None) -> float | None:
    return float(text) if text else None


def main(argv: list[str]) -> None:
    folder = Path(os.environ.get(RUN_FOLDER_VARIABLE) or os.getcwd())
    install(ReplyChecks(max_update_norm(os.environ.get(MAX_NORM_VARIABLE)), ChecksFile(folder / REPLY_CHECKS)))
    sys.argv = ["flwr-serverapp", *argv]
    flwr_serverapp()


if __name__ == "__main__":
    main(sys.argv[1:])
