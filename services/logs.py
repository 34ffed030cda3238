"""One log format for Bouquet's own messages. Flower keeps its own handler on the "flwr"
logger; configuring the root logger would print every Flower line twice."""

from __future__ import annotations

import logging
import sys

LEGACY_RUNTIME_NOTE = (
    "task mode runs on Flower's legacy gRPC runtime (start_server/start_client, deprecated since flwr 1.13); "
    "app mode (FL_MODE=app) runs on the Deployment Engine"
)


def setup(level: int = logging.INFO) -> None:
    logger = logging.getLogger("bouquet")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, LegacyRuntimeBanner) for f in flower.filters):
        flower.addFilter(LegacyRuntimeBanner())


class LegacyRuntimeBanner(logging.Filter):
    """Flower prints a 12-line deprecation banner every time start_server/start_client is called
    (a client that reconnects prints it again): in a 20-replica run that buried the log. It is
    replaced by one line of ours, once per process."""

    def __init__(self) -> None:
        super().__init__()
        self.noted = False

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if not text.startswith("DEPRECATED FEATURE") or not any(
            name in str(record.args) for name in ("start_server()", "start_client()")
        ):
            return True
        if not self.noted:
            self.noted = True
            logging.getLogger("bouquet").info("%s", LEGACY_RUNTIME_NOTE)
        return False
