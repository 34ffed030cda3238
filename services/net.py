"""Network helpers every part of Bouquet shares (client, TLS probe, launcher, benchmark, tests):
reading a ``host:port`` address, finding a free port, asking whether a port accepts connections,
and waiting until a process we started listens. Standard library only, no Bouquet import: the
lowest layer.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
import time

ADDRESS_FORM = "must be HOST:PORT (e.g. 0.0.0.0:8080, server:8080, [::]:8080) with PORT in 1-65535"
_ADDRESS = re.compile(r"\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<v6port>\d+)|(?P<host>[^:\[\]]+):(?P<port>\d+)")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port), the host an IP address or a DNS name; the one
    parser of addresses (settings validate with it). Raises ValueError(ADDRESS_FORM) otherwise."""
    match = _ADDRESS.fullmatch(address)
    if not match:
        raise ValueError(ADDRESS_FORM)
    port = int(match.group("v6port") or match.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(ADDRESS_FORM)
    if match.group("v6"):
        try:
            ipaddress.IPv6Address(match.group("v6"))
        except ValueError:
            raise ValueError(ADDRESS_FORM) from None
        return match.group("v6"), port
    if not _HOSTNAME.match(match.group("host")):
        raise ValueError(ADDRESS_FORM)
    return match.group("host"), port


def accepts_connections(address: str, timeout: float) -> bool:
    """Whether ``address`` accepts a TCP connection within ``timeout`` seconds (the connection is closed at once)."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` (one of this machine's addresses) that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_until_listening(address: str, process: subprocess.Popen, timeout: float, name: str, poll: float = 0.1) -> None:
    """Return once the process we started accepts connections on ``address``; raise
    RuntimeError if it exits first or does not listen within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode} before listening on {address}")
        if accepts_connections(address, timeout=0.5):
            return
        time.sleep(poll)
    raise RuntimeError(f"{name} did not listen on {address} within {timeout:g} s")
