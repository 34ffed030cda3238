"""The inspect-only Docker API proxy (issue 12): the memory sidecar's one way to Docker's names.

A fake Docker daemon listens on a Unix socket and records every request; the real proxy runs as
a process in front of it. Only GET /containers/<id>/json gets through, and only names,
hostname and labels come back (never the container's environment)."""

from __future__ import annotations

import json
import socketserver
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from conftest import PYTHON, REPO
from services.net import free_port, wait_until_listening
from services.monitor.containers import ContainerNames

CID = "ab12" * 16
INSPECT = {
    "Id": CID,
    "Name": "/bouquet-client-3",
    "Config": {
        "Hostname": CID[:12],
        "Env": ["HF_TOKEN=secret-token", "PATH=/usr/bin"],
        "Labels": {"com.docker.compose.service": "client", "com.docker.compose.container-number": "3"},
    },
    "HostConfig": {"Binds": ["/:/host"]},
}


class FakeDocker(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str) -> None:
        self.requests: list[tuple[str, str]] = []
        docker = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                docker.requests.append((self.command, self.path))
                found = self.command == "GET" and self.path.rstrip("/").endswith(f"/containers/{CID}/json")
                body = json.dumps(INSPECT if found else {"message": "whatever"}).encode()
                self.send_response(200 if found else 201 if self.command == "POST" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = _serve

            def address_string(self) -> str:  # a Unix socket has no (host, port)
                return "docker"

            def log_message(self, *args) -> None:
                pass

        super().__init__(path, Handler)


@pytest.fixture
def proxy():
    folder = Path(tempfile.mkdtemp(prefix="bq-"))  # short: Unix socket paths are limited to 107 bytes
    docker = FakeDocker(str(folder / "docker.sock"))
    threading.Thread(target=docker.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen([PYTHON, "-m", "services.monitor.inspect_proxy", "--listen", address, "--socket", str(folder / "docker.sock")],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_listening(address, process, timeout=60, name="inspect proxy")
        yield f"http://{address}", docker
    finally:
        process.kill()
        process.wait()
        docker.shutdown()
        docker.server_close()


def request(url: str, method: str = "GET") -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None), timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_inspect_passes_with_names_only_and_the_monitor_names_replicas_through_it(proxy):
    api, docker = proxy
    status, answer = request(f"{api}/v1.41/containers/{CID}/json")
    assert status == 200
    assert answer == {"Id": CID, "Name": "/bouquet-client-3", "Config": {"Hostname": CID[:12], "Labels": INSPECT["Config"]["Labels"]}}
    assert "secret-token" not in json.dumps(answer)
    container = ContainerNames(api).lookup(CID, lambda: CID[:12])
    assert (container.replica, container.hostname) == ("client-3", CID[:12])


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/containers/create"),  # what a :ro socket mount still allows
        ("POST", f"/containers/{CID}/exec"),
        ("GET", f"/containers/{CID}/logs?stdout=1"),
        ("GET", f"/containers/{CID}/archive?path=/etc"),
        ("GET", "/containers/json"),
        ("GET", "/images/json"),
        ("DELETE", f"/containers/{CID}"),
        ("GET", f"/containers/{CID}/json?size=1"),
        ("GET", "/containers/bouquet-client-3/json"),  # by name: not a container id
    ],
)
def test_every_other_call_is_refused_and_never_reaches_docker(proxy, method, path):
    api, docker = proxy
    status, answer = request(f"{api}{path}", method)
    assert status == 403 and "only GET /containers/<id>/json" in answer["message"]
    assert docker.requests == []
