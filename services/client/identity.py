"""A client's identity, which the server maps to its partition (``services.server.registry``).

By default it is the hostname: a compose replica's container id, a Kubernetes pod's name, both
unique and stable across restarts of that replica. Replicas that share a hostname (compose's
``network_mode: host``, used to reach a server through the host's loopback or a tunnel) would be
one client to the server; ``container`` gives each its own: the hostname plus a random id kept in
the container's own filesystem, so it survives a restart of that container and a new container
gets a new one, as a new container gets a new hostname.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

from services.files import atomic_write

ID_FILE = ".bouquet-identity"


def identity(client_id: str | None, source: str, home: Path | None = None) -> str:
    if client_id:
        return client_id
    hostname = socket.gethostname()
    if source == "hostname":
        return hostname
    return f"{hostname}-{container_suffix(home or Path.home())}"


def container_suffix(home: Path) -> str:
    """The random id stored in ``home``, created on first use (atomically: replicas never share a home)."""
    path = home / ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    suffix = secrets.token_hex(6)
    with atomic_write(path) as out:
        out.write(suffix + "\n")
    return suffix
