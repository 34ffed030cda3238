"""``python -m services.appmode.refusal``: fail one ClientApp message visibly, through Flower itself.

When the node cannot serve a message (no slot in time, the fork failed, the warm process died),
doing nothing is the worst answer: SuperExec never learns that its launch failed, launches the
task again every ~30 s and ``flwr run`` hangs with nothing logged. So the node runs Flower's own
ClientApp runtime once more for that message, with the app replaced by one that raises the
cause: Flower pulls the message, sends the ServerApp an error reply carrying the cause, marks
the task failed and exits. The token comes in a file (``--token-file``), never on this
process's command line; the cause comes in ``BOUQUET_REFUSAL_CAUSE``.
"""

from __future__ import annotations

import json
import os
import sys

from services.appmode.clientapp import run_flower

CAUSE_VARIABLE = "BOUQUET_REFUSAL_CAUSE"


class NodeCouldNotServe(RuntimeError):
    """Bouquet's node could not run this message in a worker; the message says why."""


class _Refusing:
    def __init__(self, cause: str) -> None:
        self.cause = cause

    def __call__(self, message: object, context: object) -> object:
        raise NodeCouldNotServe(self.cause)


def main(argv: list[str]) -> int:
    cause = os.environ.get(CAUSE_VARIABLE, "Bouquet's node could not serve this message (no cause given)")
    outcome = run_flower(argv, replace=lambda: _Refusing(cause))
    print(json.dumps({"refusal": outcome}), flush=True)  # the node reads this last line
    return 0 if outcome["message_type"] is not None else 1  # 1: Flower had no message to fail


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
