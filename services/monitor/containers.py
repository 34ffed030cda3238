"""Which container a host PID runs in, and what to call it, without the keys to the host.

With ``pid: host`` the monitor sees every process of the host. /proc/<pid>/cgroup names the
container by its 64-hex id (cgroup v1 ``/docker/<id>``, v2 ``/system.slice/docker-<id>.scope``,
containerd ``cri-containerd-<id>.scope``, or ``/../<id>`` across cgroup namespaces), and the
container's own /etc/hostname, read through /proc/<pid>/root, is the identity a replica
reports to the server (its hostname: the short container id in compose, the pod name in
Kubernetes). Both need only CAP_SYS_PTRACE, never the Docker API.

Compose's own names (``client-3``) live only in Docker's labels. A user who wants them runs the
inspect-only proxy (services.monitor.inspect_proxy: compose service docker-names, COMPOSE_PROFILES=names) and sets
``FL_DOCKER_API``: the monitor then asks it ``GET /containers/<id>/json``, the one call the
proxy lets through, once per container.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("bouquet.monitor")

_CONTAINER_ID = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?(?:/|$)")


def container_id_from_cgroup(text: str) -> str | None:
    """The container id in the text of /proc/<pid>/cgroup, or None for a process on the host."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            match = _CONTAINER_ID.search(parts[2])
            if match:
                return match.group(1)
    return None


def read_container_id(pid: int, proc: str = "/proc") -> str | None:
    try:
        with open(os.path.join(proc, str(pid), "cgroup")) as cgroup:
            return container_id_from_cgroup(cgroup.read())
    except OSError:
        return None


def read_hostname(pid: int, proc: str = "/proc") -> str | None:
    """The hostname of the container ``pid`` runs in (its /etc/hostname), or None when it cannot
    be read (the process exited, or the monitor lacks CAP_SYS_PTRACE)."""
    try:
        with open(os.path.join(proc, str(pid), "root", "etc", "hostname")) as hostname:
            return hostname.read().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class Container:
    id: str
    hostname: str | None = None  # what a client replica reports as its identity
    name: str | None = None  # the rest only through FL_DOCKER_API
    service: str | None = None  # com.docker.compose.service
    number: str | None = None  # com.docker.compose.container-number

    @property
    def named(self) -> bool:
        """Whether Docker gave its compose names (reads better than a hostname)."""
        return self.service is not None or self.name is not None

    @property
    def replica(self) -> str:
        if self.service and self.number:
            return f"{self.service}-{self.number}"
        return self.name or self.hostname or self.id[:12]


def inspect_over_http(api: str, container_id: str) -> dict:
    """``GET <api>/containers/<id>/json``: the only Docker call the monitor makes, and only
    to the inspect-only proxy the user set up."""
    with urllib.request.urlopen(f"{api.rstrip('/')}/containers/{container_id}/json", timeout=3) as response:
        return json.load(response)


class ContainerNames:
    """Describes each container once: its hostname from /proc, and with ``docker_api`` set,
    its compose names from Docker's labels. An API that does not answer (the proxy still
    starting, or not started) is said once and asked again after RETRY_S; containers described
    meanwhile are described again then."""

    RETRY_S = 30.0

    def __init__(
        self, docker_api: str | None = None, inspect: Callable[[str, str], dict] = inspect_over_http, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.docker_api = docker_api
        self._inspect = inspect
        self._clock = clock
        self._known: dict[str, Container] = {}
        self._unnamed: set[str] = set()  # described while the API did not answer
        self._failed_at: float | None = None

    def lookup(self, container_id: str, hostname: Callable[[], str | None]) -> Container:
        """``hostname`` reads it from one of the container's processes (called once per container)."""
        known = self._known.get(container_id)
        if known is not None and not (container_id in self._unnamed and self._api_ready()):
            return known
        self._unnamed.discard(container_id)
        labels = self._labels(container_id)
        if labels is None:
            self._unnamed.add(container_id)
        self._known[container_id] = Container(container_id, known.hostname if known else hostname(), **(labels or {}))
        return self._known[container_id]

    def _api_ready(self) -> bool:
        return self.docker_api is not None and (self._failed_at is None or self._clock() - self._failed_at >= self.RETRY_S)

    def _labels(self, container_id: str) -> dict[str, str | None] | None:
        """Compose names from the API; {} when it has none for this container; None when it did not answer."""
        if self.docker_api is None:
            return {}
        if not self._api_ready():
            return None
        try:
            attrs = self._inspect(self.docker_api, container_id)
        except urllib.error.HTTPError as error:  # e.g. a container that already went away
            log.warning("FL_DOCKER_API %s could not describe container %s: HTTP %s", self.docker_api, container_id[:12], error.code)
            return {}
        except (OSError, ValueError) as error:
            if self._failed_at is None:
                log.warning("FL_DOCKER_API %s does not answer (%s): replicas are named by their hostnames until it does", self.docker_api, error)
            self._failed_at = self._clock()
            return None
        config = attrs.get("Config") or {}
        labels = config.get("Labels") or {}
        return {
            "name": (attrs.get("Name") or "").lstrip("/") or None,
            "service": labels.get("com.docker.compose.service"),
            "number": labels.get("com.docker.compose.container-number"),
        }
