"""Shared fixtures. Tests run against the repo's own venv (see README: scripts/bootstrap.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@pytest.fixture
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache per test session, like the shared data dir of a host."""
    return tmp_path_factory.getbasetemp() / "data"
