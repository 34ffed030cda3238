"""Flower's own programs as app mode starts them: where they are, their environment, the CLI's config.

Every Flower process Bouquet starts runs offline (no telemetry, no update check) and finds
Flower's console scripts (``flwr-serverapp``, ``flower-superexec``, ``flwr``) in this Python's
environment. SuperExec starts ``flwr-clientapp`` (on a SuperNode, for every message) and
``flwr-serverapp`` (on the SuperLink, for every run) by bare name, so a PATH that starts with a
``bin/`` of Bouquet's (``install_program``) starts Bouquet's own instead: the node's launcher
(``shim``) and the ServerApp's working folder (``serverapp_shim``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OFFLINE = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
CLIENTAPP_PRELOAD = ["services.appmode.clientapp"]  # flwr's ClientApp runtime: what a warm process imports for a node's message workers


def program(name: str) -> str:
    """A Flower console script of this environment (not whatever PATH finds first)."""
    return str(Path(sys.executable).parent / name)


def environment(flwr_home: Path, *, shim_dir: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    path = [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    if shim_dir is not None:
        path.insert(0, str(shim_dir))
    return {**os.environ, **OFFLINE, "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1", "PATH": os.pathsep.join(path), **(extra or {})}


def install_program(folder: Path, name: str, source: str) -> Path:
    """Write the standard-library script ``source`` as ``folder/name``, run by this interpreter with
    ``-S`` (no site-packages: it starts in milliseconds however Bouquet was installed); ``folder``
    goes first on the PATH of the Flower process that starts ``name`` by bare name."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    target.write_text(f"#!{sys.executable} -S\n" + Path(source).read_text())
    target.chmod(0o755)
    return target


def write_cli_config(flwr_home: Path, address: str, root_certificates: str | None) -> str:
    """``$FLWR_HOME/config.toml`` naming the SuperLink as connection "bouquet"; returns that name."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "bouquet"\n\n[superlink.bouquet]\naddress = "{address}"\n{security}\n')
    return "bouquet"

