"""Flower's own programs as app mode starts them: where they are, their environment, the CLI's config.

Every Flower process Bouquet starts runs offline (no telemetry, no update check) and finds
Flower's console scripts (``flwr-serverapp``, ``flower-superexec``, ``flwr``) in this Python's
environment. SuperExec starts ``flwr-clientapp`` (on a SuperNode, for every message) and
``flwr-serverapp`` (on the SuperLink, for every run) by bare name, so a PATH that starts with a
``bin/`` of Bouquet's (``install_program``) starts Bouquet's own instead: the node's launcher
(``shim``) and the ServerApp's working folder (``serverapp_shim``).
"""

from __future__ import annotations

import base64
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


def write_cli_config(flwr_home: Path, address: str, root_certificates: str | None, submit_token: str | None = None) -> str:
    """``$FLWR_HOME/config.toml`` naming the SuperLink as connection "bouquet"; returns that name.
    With ``submit_token``, ``flwr`` sends it on every Control call as ``Authorization: Bearer``,
    which the front's Control listener asks for: stored as the access token in flwr's own
    credential file, under the account-auth type whose CLI plugin sends it (OIDC's; nothing else
    of OIDC is used, and the front never answers 401, so flwr never tries to refresh it)."""
    flwr_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "bouquet"\n\n[superlink.bouquet]\naddress = "{address}"\n{security}\n')
    credentials = flwr_home / "credentials.yaml"
    if submit_token is None:
        credentials.unlink(missing_ok=True)
        return "bouquet"
    stored = {"authn-type": "oidc", "oidc-access-token": submit_token, "oidc-refresh-token": "unused"}
    credentials.touch(mode=0o600)
    credentials.write_text("".join(f"flower.account-auth.{address}.{key}: {base64.b64encode(value.encode()).decode()}\n" for key, value in stored.items()))
    return "bouquet"
