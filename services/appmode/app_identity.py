"""A Flower App as a run's parameters (the trackers' ``app.*`` and ``task.sha256``): what names
the App and its version, so two runs of different code are never compared as the same."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any

SKIPPED = {"__pycache__", "node_modules"}  # and hidden folders, and virtual environments


def app_identity(app: Path) -> dict[str, Any]:
    """Its name, version and publisher, and its run config as its pyproject.toml declares it
    (overrides are FL_APP_RUN_CONFIG, a parameter of its own)."""
    try:
        project = tomllib.loads((app / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    flwr_app = project.get("tool", {}).get("flwr", {}).get("app", {})
    identity = {"app.name": project.get("project", {}).get("name"), "app.version": project.get("project", {}).get("version"), "app.publisher": flwr_app.get("publisher")}
    identity.update({f"app.config.{key}": value for key, value in (flwr_app.get("config") or {}).items()})
    return identity


def app_fingerprint(app: Path) -> str:
    """sha256 over the App's source and configuration (.py and .toml files, by relative path),
    not looking into hidden folders, caches or a virtual environment kept inside the App."""
    digest = hashlib.sha256()
    for path in sorted(_sources(app)):
        digest.update(str(path.relative_to(app)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _sources(folder: Path) -> list[Path]:
    found = []
    for entry in folder.iterdir():
        if entry.is_dir():
            if not (entry.name.startswith(".") or entry.name in SKIPPED or (entry / "pyvenv.cfg").exists()):
                found += _sources(entry)
        elif entry.suffix in (".py", ".toml") and entry.is_file():
            found.append(entry)
    return found
