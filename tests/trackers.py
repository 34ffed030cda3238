"""The real tracking servers for the tests (benchmarks/tracking_servers.py): skipped when their
program is missing, unless BOUQUET_REQUIRE_TRACKERS=1 (CI installs them), where that fails."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from benchmarks.tracking_servers import MlflowServer, ProgramMissing, Prometheus, find_program, free_port, wait_for

__all__ = ["MlflowServer", "Prometheus", "free_port", "wait_for", "program", "needs"]


def needs(start: Callable[[], object]) -> object:
    """``start()``, or skip (fail in CI) when its program is not installed."""
    try:
        return start()
    except ProgramMissing as missing:
        if os.environ.get("BOUQUET_REQUIRE_TRACKERS") == "1":
            pytest.fail(str(missing))
        pytest.skip(str(missing))


def program(name: str, variable: str, candidates: list[Path]) -> str:
    return needs(lambda: find_program(name, variable, candidates))  # type: ignore[return-value]
