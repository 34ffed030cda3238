"""App mode's front on real processes over loopback: who reaches what on the published port.

A real link (SuperLink behind Bouquet's nginx front), real node agents with their SuperNodes,
with Bouquet's TLS certificates and without. A stranger on the published port is refused Control
(register-node, start-run, list-runs), Runtime (acquire-task) and Flower's /openapi.json and /docs,
which the SuperLink itself serves (checked on its own loopback port, so the refusals are the
front's); the private Control listener serves only the submit token's holders; with TLS a stock
``flower-supernode`` whose key Bouquet did not register is refused and said once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import PYTHON, REPO
from services.appmode import flower
from services.certs import make_certificates
from services.files import JOINS_REFUSED
from services.net import free_port

pytestmark = pytest.mark.integration

NODES = 2
START_S = 420  # a loaded 2-core host starts the SuperLink and two warm processes in minutes, not seconds
STRANGER_CALLS = [
    ("POST", "/v1/control/register-node"),
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/runtime/acquire-task"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
]


class Federation:
    """A link and NODES node agents, their logs in ``folder``."""

    def __init__(self, folder: Path, tls: bool) -> None:
        self.folder = folder
        self.tls_dir = folder / "tls" if tls else None
        if self.tls_dir is not None:
            make_certificates(self.tls_dir, ["localhost"], ["127.0.0.1"], days=2)
        self.data = folder / "data"
        self.published = f"127.0.0.1:{free_port()}"
        self.control = f"127.0.0.1:{free_port()}"
        self.token_file = folder / "submit-token"
        self.token_file.write_text("a" * 16 + os.urandom(16).hex() + "\n")
        self.token_file.chmod(0o600)
        self.processes: list[subprocess.Popen] = []
        tls_flags = ["--tls-dir", str(self.tls_dir)] if self.tls_dir else []
        self.link_log = folder / "link.log"
        self._start(self.link_log, ["-m", "services.appmode.link", "--listen-address", self.published, "--control-address", self.control,
                                    "--submit-token-file", str(self.token_file), "--min-clients", str(NODES), "--join-grace", "0",
                                    "--data-dir", str(self.data), "--results-dir", str(folder / "results"), *tls_flags])
        for index in range(NODES):
            self._start(folder / f"node-{index}.log", ["-m", "services.appmode.node", "--server-address", self.published, "--data-dir", str(self.data),
                                                       "--worker-slots", "1", *tls_flags], {"FL_CLIENT_ID": f"node-{index}"})
        self.home = folder / "flwr-home"
        self.ca = str(self.tls_dir / "ca.crt") if self.tls_dir else None

    def _start(self, log: Path, argv: list[str], env: dict[str, str] | None = None) -> None:
        with open(log, "w") as out:
            self.processes.append(subprocess.Popen([PYTHON, *argv], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}))

    def log(self) -> str:
        return self.link_log.read_text(errors="replace")

    def superlink_port(self) -> int:
        return int(re.search(r"flower-superlink \(pid \d+\) on 127\.0\.0\.1:(\d+)", self.log()).group(1))

    def flwr(self, *args: str, token: str | None) -> subprocess.CompletedProcess:
        flower.write_cli_config(self.home, self.control, self.ca, token)
        return subprocess.run([flower.program("flwr"), *args], env=flower.environment(self.home), capture_output=True, text=True, timeout=300)  # flwr takes 20 s to answer on a loaded 2-core host

    def online(self) -> int:
        try:
            listed = self.flwr("supernode", "list", "bouquet", "--format", "json", token=self.token_file.read_text().strip())
            return sum(1 for node in json.loads(listed.stdout).get("nodes", []) if str(node.get("status")).lower() == "online")
        except (ValueError, subprocess.TimeoutExpired):
            return 0

    def wait_until(self, what: str, done, timeout: float = START_S) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            for process in self.processes:
                assert process.poll() is None, f"{process.args} exited with {process.returncode} while waiting until {what}\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"not {what} within {timeout} s\n{self.log()[-3000:]}"
            time.sleep(0.5)

    def client(self) -> httpx.Client:
        scheme = "https" if self.tls_dir else "http"
        return httpx.Client(base_url=f"{scheme}://{self.published}", verify=self.ca or False, timeout=30)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module", params=["tls", "plain"])
def federation(request, tmp_path_factory):
    running = Federation(tmp_path_factory.mktemp(f"front-{request.param}"), tls=request.param == "tls")
    try:
        running.wait_until("the front listens", lambda: "front (nginx, pid" in running.log())
        running.wait_until(f"{NODES} SuperNodes online", lambda: running.online() >= NODES)
        yield running
    finally:
        running.stop()


def test_a_stranger_on_the_published_port_reaches_neither_control_nor_runtime_nor_flowers_api_pages(federation):
    with federation.client() as stranger:
        refused = {path: stranger.request(method, path, content=b"").status_code for method, path in STRANGER_CALLS}
        wrong_method = stranger.get("/v1/fleet/pull-messages").status_code
    assert refused == {path: 404 for _, path in STRANGER_CALLS}
    assert wrong_method == 403  # Fleet answers POST only
    # ... while the SuperLink behind the front serves them all: the 404s are the front's
    scheme = "https" if federation.tls_dir else "http"
    context = ssl.create_default_context(cafile=federation.ca) if federation.ca else False
    if context:
        context.check_hostname = False
    with httpx.Client(base_url=f"{scheme}://127.0.0.1:{federation.superlink_port()}", verify=context, timeout=30) as inside:
        assert inside.get("/openapi.json").status_code == 200
        assert inside.post("/v1/control/list-runs", content=b"").status_code != 404


def test_control_is_served_only_on_the_private_listener_and_only_with_the_submit_token(federation):
    assert federation.online() == NODES  # the token's holder lists the nodes (what submit does first)
    for token in (None, "b" * 64):
        listed = federation.flwr("supernode", "list", "bouquet", "--format", "json", token=token)
        answer = json.loads(listed.stdout)  # flwr --format json exits 0 and says success: false
        assert answer["success"] is False and "403 Forbidden" in answer["error-message"] and "nodes" not in answer, answer
    scheme = "https" if federation.tls_dir else "http"
    with httpx.Client(base_url=f"{scheme}://{federation.control}", verify=federation.ca or False, timeout=30) as caller:
        assert caller.post("/v1/control/list-runs", content=b"").status_code == 403
        assert caller.post("/v1/fleet/register-node", content=b"").status_code == 404
        assert caller.get("/openapi.json").status_code == 404
    token = federation.token_file.read_text().strip()
    for log in federation.folder.glob("*.log"):
        assert token not in log.read_text(errors="replace"), f"the submit token is in {log.name}"


def test_without_tls_the_link_says_once_that_supernode_authentication_is_off(federation):
    said = federation.log().count("SuperNode authentication is off")
    assert said == (0 if federation.tls_dir else 1), federation.log()[-2000:]


def _stranger_key(folder: Path, name: str) -> tuple[Path, str]:
    """A key Bouquet never registered, as ``flower-supernode`` reads it, and its fingerprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from services.appmode.front import fingerprint
    from services.appmode.node_keys import public_pem

    key = ec.generate_private_key(ec.SECP384R1())
    key_file = folder / name
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    key_file.chmod(0o600)
    return key_file, fingerprint(public_pem(key))


def _stranger(federation: Federation, folder: Path, key_file: Path, log_name: str) -> subprocess.Popen:
    home = folder / f"home-{log_name}"
    home.mkdir()
    with open(folder / f"{log_name}.log", "w") as out:
        return subprocess.Popen(
            [flower.program("flower-supernode"), "--root-certificates", federation.ca, "--superlink", federation.published,
             "--auth-supernode-private-key", str(key_file), "--host", "127.0.0.1", "--port", str(free_port()), "--max-retries", "0"],
            env=flower.environment(home), stdout=out, stderr=subprocess.STDOUT)


def test_a_stock_supernode_whose_key_was_not_registered_is_refused_and_said_once(federation, tmp_path):
    if federation.tls_dir is None:
        pytest.skip("Flower allows SuperNode authentication only over TLS (the test above: said once)")
    key_file, name = _stranger_key(tmp_path, "stranger-key")
    for attempt in range(2):  # the same stranger twice
        stranger = _stranger(federation, tmp_path, key_file, f"stranger-{attempt}")
        try:
            stranger.wait(timeout=180)  # refused, it gives up
        finally:
            if stranger.poll() is None:
                stranger.kill()
                stranger.wait()
        assert stranger.returncode != 0, (tmp_path / f"stranger-{attempt}.log").read_text()[-2000:]
    # another stranger after them: once it is said, the front's log has been read past both attempts
    other_file, other = _stranger_key(tmp_path, "other-key")
    third = _stranger(federation, tmp_path, other_file, "other")
    try:
        federation.wait_until("the other stranger was said", lambda: f"(key {other})" in federation.log(), timeout=180)
    finally:
        third.kill()
        third.wait()
    refusals = [line for line in federation.log().splitlines() if f"(key {name})" in line]
    assert len(refusals) == 1, refusals
    assert "refused a SuperNode from 127.0.0.1" in refusals[0] and "412" in refusals[0] and "not registered" in refusals[0], refusals
    assert federation.online() == NODES  # Bouquet's own nodes only
    # recorded for the run's summary (joins_refused): each stranger once, with its address and key
    noted = [json.loads(line) for line in (federation.folder / "results" / JOINS_REFUSED).read_text().splitlines()]
    assert sorted(line["key"] for line in noted) == sorted([name, other]) and {line["address"] for line in noted} == {"127.0.0.1"}, noted
