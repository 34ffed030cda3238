"""One log format for Bouquet's own messages. Flower keeps its own handler on the "flwr"
logger; configuring the root logger would print every Flower line twice."""

from __future__ import annotations

import logging
import sys


def setup(level: int = logging.INFO) -> None:
    logger = logging.getLogger("bouquet")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
