"""App mode's front: Debian's nginx before the SuperLink, so that strangers reach only what a SuperNode needs.

Flower 1.42's SuperLink serves Fleet, Control (submit, stop and list runs, register nodes: no
account check in open-source Flower), Runtime and ``/openapi.json`` on ONE port. The SuperLink
therefore listens on 127.0.0.1 only, and this front serves:

- the published address (FL_LISTEN_ADDRESS): exactly the ``POST /v1/fleet/*`` calls flwr 1.42's
  SuperNode makes (``supernode/fleet_http_client.py``); anything else answers 404;
- the private Control address (FL_CONTROL_ADDRESS), only with a submit token: ``/v1/control/*``
  for a request whose ``Authorization`` header is ``Bearer <token>`` (what ``flwr`` sends once
  ``flower.write_cli_config`` stored the token as its credential), 403 otherwise; the header
  is removed before the SuperLink sees it.

Both over TLS with Bouquet's certificates when FL_TLS_DIR is set. No access log: SuperNode
signatures cover a timestamp only (replayable for 305 s), so no request header is ever logged.
The one log kept is of refused SuperNode calls (401/412 from the SuperLink): address, status,
path and the node's public key, which ``Refusals`` reads to say each refused node once.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import pwd
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from services import lifetime
from services.net import split_address

log = logging.getLogger("bouquet.front")

# Every Fleet call of flwr 1.42.0's SuperNode (supernode/fleet_http_client.py), and nothing else.
FLEET_CALLS = (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object", "confirm-message-received",
)
REFUSED_STATUSES = (401, 412)  # the SuperLink's answer to a bad signature / an unregistered key
REFUSED_LOG = "refused.log"
REFUSED_LOG_CAP = 16 * 1024 * 1024  # bytes read before the log is emptied
NOT_INSTALLED = "app mode's front needs nginx (Debian: apt-get install nginx-light; the server image has it)"


def nginx_program() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


@dataclass(frozen=True)
class Plan:
    """Where the front listens and what it forwards to."""

    listen_address: str  # published: Fleet only
    superlink_port: int  # the SuperLink on 127.0.0.1
    tls_dir: str | None
    control_address: str | None = None  # private Control listener; None: none
    submit_token: str | None = None


def _listen(address: str) -> str:
    host, port = split_address(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def config(plan: Plan, folder: Path) -> str:
    """nginx.conf for ``plan``, its temporary files and pid under ``folder`` (private, 0700)."""
    scheme = "https" if plan.tls_dir else "http"
    ssl = ""
    if plan.tls_dir:
        tls = Path(plan.tls_dir).resolve()
        ssl = f"    ssl_certificate {tls / 'server.crt'};\n    ssl_certificate_key {tls / 'server.key'};\n    ssl_protocols TLSv1.2 TLSv1.3;\n"
    listen_ssl = " ssl" if plan.tls_dir else ""
    upstream_tls = "    proxy_ssl_verify off;  # 127.0.0.1 in the same container: TLS only because Flower needs it for SuperNode auth\n" if plan.tls_dir else ""
    fleet = "|".join(FLEET_CALLS)
    control = ""
    if plan.control_address is not None and plan.submit_token is not None:
        control = f"""
  map $http_authorization $bouquet_submit_allowed {{
    "Bearer {plan.submit_token}" 1;
    default 0;
  }}
  server {{
    listen {_listen(plan.control_address)}{listen_ssl};
{ssl}    location /v1/control/ {{
      if ($bouquet_submit_allowed = 0) {{ return 403; }}
      proxy_set_header Authorization "";
      proxy_pass {scheme}://bouquet_superlink;
{upstream_tls}    }}
    location / {{ return 404; }}
  }}
"""
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""  # workers as the link's own user
    return f"""{user}daemon off;
master_process on;
worker_processes 1;
pid {folder / 'nginx.pid'};
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server_tokens off;
  map_hash_bucket_size 128;  # the submit token is one long map key
  client_body_temp_path {folder / 'body'};
  proxy_temp_path {folder / 'proxy'};
  fastcgi_temp_path {folder / 'fastcgi'};
  uwsgi_temp_path {folder / 'uwsgi'};
  scgi_temp_path {folder / 'scgi'};
  client_max_body_size 0;
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_request_buffering off;
  proxy_buffering off;
  proxy_read_timeout 3600s;
  proxy_send_timeout 3600s;
  keepalive_timeout 75s;
  log_format bouquet_refused '$remote_addr $status $uri $http_flwr_public_key';
  map $status $bouquet_refused {{
{''.join(f'    {status} 1;{chr(10)}' for status in REFUSED_STATUSES)}    default 0;
  }}
  upstream bouquet_superlink {{
    server 127.0.0.1:{plan.superlink_port};
    keepalive 64;
  }}
  server {{
    listen {_listen(plan.listen_address)}{listen_ssl};
{ssl}    location ~ ^/v1/fleet/({fleet})$ {{
      limit_except POST {{ deny all; }}
      access_log {folder / REFUSED_LOG} bouquet_refused if=$bouquet_refused;
      proxy_pass {scheme}://bouquet_superlink;
{upstream_tls}    }}
    location / {{ return 404; }}
  }}
{control}}}
"""


def start(plan: Plan, folder: Path) -> subprocess.Popen:
    """nginx with ``config(plan)``, a child that dies with this process; raises RuntimeError when
    nginx is missing or refuses its configuration (nothing is left running)."""
    program = nginx_program()
    if program is None:
        raise RuntimeError(NOT_INSTALLED)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = folder / "nginx.conf"
    conf.write_text(config(plan, folder))
    conf.chmod(0o600)  # it holds the submit token
    checked = subprocess.run([program, "-t", "-q", "-p", str(folder), "-c", str(conf), "-e", "stderr"], capture_output=True, text=True)
    if checked.returncode != 0:
        raise RuntimeError(f"nginx refused the front's configuration: {checked.stderr.strip()[-600:]}")
    return lifetime.start([program, "-p", str(folder), "-c", str(conf), "-e", "stderr"])


def fingerprint(public_key: bytes) -> str:
    """A node's name where it has no other: SHA-256 of its public key (PEM), 16 hex digits."""
    return hashlib.sha256(public_key).hexdigest()[:16]


class Refusals:
    """Reads the front's log of refused SuperNode calls and says each refused node once (address, key)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / REFUSED_LOG
        self.offset = 0
        self.said: set[tuple[str, str]] = set()

    def read(self) -> list[tuple[str, str, int, str]]:
        """New refusals since the last read, as (address, key fingerprint, status, path); each node said once."""
        try:
            with open(self.path, "rb") as lines:
                lines.seek(self.offset)
                chunk = lines.read()
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        if self.offset > REFUSED_LOG_CAP and len(complete) == len(chunk):  # a stranger retrying for ever: the log stays small
            os.truncate(self.path, 0)  # nginx appends (O_APPEND): its next line starts the file again
            self.offset = 0
        fresh = []
        for line in complete.decode(errors="replace").splitlines():
            parts = line.split(" ")
            if len(parts) != 4 or not parts[1].isdigit():
                continue
            address, status, path, key = parts
            try:
                name = fingerprint(base64.b64decode(key, validate=True)) if key != "-" else "none (no key sent)"
            except ValueError:
                name = "unreadable"
            if (address, name) in self.said:
                continue
            self.said.add((address, name))
            fresh.append((address, name, int(status), path))
            why = "its key is not registered" if int(status) == 412 else "its signature was refused (wrong key, or a timestamp outside 305 s)"
            log.warning("refused a SuperNode from %s (key %s): %s on %s, %s; said once per node", address, name, status, path, why)
        return fresh

    def watch(self, stop: threading.Event, every: float = 1.0, note: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Read the refusals every ``every`` s; ``note`` gets each refused node once (for the run's records)."""
        while not stop.wait(every):
            for address, key, status, path in self.read():
                if note is not None:
                    note({"at": round(time.time(), 4), "address": address, "key": key, "status": status, "path": path})
