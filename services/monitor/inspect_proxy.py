"""``python -m services.monitor.inspect_proxy``: the Docker API with one call left in it.

Whoever reaches the Docker socket is root on the host, read-only mount or not (a root process
in a container with the socket mounted ``:ro`` can create containers through it). The memory
sidecar needs one thing from Docker, and only to show compose names (``client-3``) instead of
hostnames: ``GET /containers/<id>/json``. This proxy holds the socket and answers that call
only, and of its answer passes on only the container's name, hostname and labels (inspect
also returns every environment variable of the container, tokens included). Everything else
gets 403. Compose runs it as the service docker-names (COMPOSE_PROFILES=names); nothing in
Bouquet needs it.

Standard library only: the well-known socket proxies filter by API section (``CONTAINERS=1``
also opens logs and archive downloads) rather than by call and field.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import re
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from services import logs
from services.net import split_address

log = logging.getLogger("bouquet.inspect_proxy")

ALLOWED = re.compile(r"^(?:/v1\.\d+)?/containers/([0-9a-f]{12,64})/json$")  # an id, no name, no query


def only_names(attrs: dict) -> dict:
    """The part of an inspect answer the monitor uses."""
    config = attrs.get("Config") or {}
    return {"Id": attrs.get("Id"), "Name": attrs.get("Name"), "Config": {"Hostname": config.get("Hostname"), "Labels": config.get("Labels") or {}}}


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float = 5.0) -> None:
        super().__init__("docker", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def make_handler(socket_path: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if not ALLOWED.match(self.path):
                return self._refuse()
            connection = UnixConnection(socket_path)
            try:
                connection.request("GET", self.path)
                response = connection.getresponse()
                body = response.read()
            except OSError as error:
                return self._answer(502, {"message": f"Docker socket {socket_path}: {error}"})
            finally:
                connection.close()
            if response.status != 200:
                return self._answer(response.status, {"message": body.decode("utf-8", "replace")[:200]})
            self._answer(200, only_names(json.loads(body)))

        def _refuse(self) -> None:
            log.warning("refused %s %s", self.command, self.path)
            self._answer(403, {"message": "only GET /containers/<id>/json is allowed"})

        do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _refuse

        def _answer(self, status: int, document: dict) -> None:
            data = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
            log.debug(format, *args)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="services.monitor.inspect_proxy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="0.0.0.0:2375", help="HOST:PORT to serve on (default 0.0.0.0:2375, inside the compose network only)")
    parser.add_argument("--socket", default="/var/run/docker.sock", help="the Docker socket (default /var/run/docker.sock)")
    options = parser.parse_args(argv)
    logs.setup()
    host, port = split_address(options.listen)
    server = ThreadingHTTPServer((host, port), make_handler(options.socket))
    log.info("serving GET /containers/<id>/json (names, hostname, labels only) on %s from %s", options.listen, options.socket)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
