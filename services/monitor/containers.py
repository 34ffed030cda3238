"""Which container a host PID runs in (its cgroup) and what that container is called (Docker).

With ``pid: host`` the monitor sees every process of the host. /proc/<pid>/cgroup names the
container by its 64-hex id (cgroup v1 ``/docker/<id>``, v2 ``/system.slice/docker-<id>.scope``,
containerd ``cri-containerd-<id>.scope``, or ``/../<id>`` across cgroup namespaces). The Docker
API, reached through the socket mounted into the monitor only, turns the id into the compose
service and replica number, and the hostname a replica uses as its client identity.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

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


@dataclass(frozen=True)
class Container:
    id: str
    name: str | None = None
    service: str | None = None  # com.docker.compose.service
    number: str | None = None  # com.docker.compose.container-number
    hostname: str | None = None  # what a client replica reports as its identity
    project: str | None = None  # com.docker.compose.project

    @property
    def replica(self) -> str:
        if self.service and self.number:
            return f"{self.service}-{self.number}"
        return self.name or self.id[:12]


def _docker_client(socket_path: str) -> Any:
    import docker  # the SDK is needed only where the socket is mounted

    return docker.DockerClient(base_url=f"unix://{socket_path}", timeout=3)


class DockerNames:
    """Names containers through the Docker API, once per container; without the socket, by short id.

    Only ``inspect`` (GET) calls are made.
    """

    def __init__(self, socket_path: str | None, client_factory: Callable[[str], Any] = _docker_client) -> None:
        self.socket_path = socket_path
        self._factory = client_factory
        self._client: Any = None
        self._disabled = socket_path is None
        self._known: dict[str, Container] = {}

    def lookup(self, container_id: str) -> Container:
        if container_id not in self._known:
            self._known[container_id] = self._ask(container_id)
        return self._known[container_id]

    def _ask(self, container_id: str) -> Container:
        client = self._connect()
        if client is None:
            return Container(container_id)
        try:
            attrs = client.containers.get(container_id).attrs
        except Exception as error:  # a container that already went away, or an API error
            log.warning("Docker could not describe container %s: %s", container_id[:12], error)
            return Container(container_id)
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        return Container(
            container_id,
            name=(attrs.get("Name") or "").lstrip("/") or None,
            service=labels.get("com.docker.compose.service"),
            number=labels.get("com.docker.compose.container-number"),
            hostname=(attrs.get("Config") or {}).get("Hostname"),
            project=labels.get("com.docker.compose.project"),
        )

    def _connect(self) -> Any:
        if self._client is None and not self._disabled:
            if not os.path.exists(self.socket_path):
                log.warning("no Docker socket at %s: containers are named by their short id", self.socket_path)
                self._disabled = True
                return None
            try:
                self._client = self._factory(self.socket_path)
            except Exception as error:
                log.warning("cannot use the Docker socket %s (%s): containers are named by their short id", self.socket_path, error)
                self._disabled = True
        return self._client
