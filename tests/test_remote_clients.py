"""Several Docker hosts: docker-compose.remote-clients.yml runs client-only replicas that join a
server published by another compose project. Checked on this one machine with two compose
projects: the first a normal run whose server port is published on 127.0.0.1 only, the second
client-only, on the host's network, joining through 127.0.0.1:<port>. The extra replicas must be
counted in (FL_MIN_CLIENTS = all hosts' replicas) and get partitions of their own although all of
them share one hostname.

The run is marked ``docker`` and skips like tests/test_compose.py (fails under BOUQUET_REQUIRE_DOCKER=1).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from test_compose import REPO, Stack, _docker_ready, assert_exits_0

REMOTE = REPO / "docker-compose.remote-clients.yml"
REMOTE_GPU = REPO / "docker-compose.remote-clients.gpu.yml"
REMOTE_TLS = REPO / "docker-compose.remote-clients.tls.yml"


def test_remote_clients_file_passes_only_client_settings_documented_in_dotenv() -> None:
    from services import settings

    known = {setting.env for setting in settings.CLIENT}
    environment = yaml.safe_load(REMOTE.read_text())["services"]["client"]["environment"]
    assert {key for key in environment if key.startswith("FL_")} <= known
    assert environment["FL_IDENTITY_SOURCE"] == "container", "replicas may share a hostname (site name, host network)"
    env_text = (REPO / ".env").read_text()
    for key, value in environment.items():
        if value is None:
            assert re.search(rf"^#?\s*{key}=", env_text, re.M), f"{key} is not in .env"
    assert set(yaml.safe_load(REMOTE_GPU.read_text())["services"]) == {"client"}


def test_remote_clients_files_are_valid_against_the_compose_spec() -> None:
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(REMOTE), str(REMOTE_GPU), str(REMOTE_TLS)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


LOCAL, REMOTE_REPLICAS = 2, 2


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_a_second_compose_project_joins_through_the_loopback_port_as_extra_replicas(tmp_path: Path) -> None:
    compose = _docker_ready("v2")
    results = tmp_path / "results"
    results.mkdir()
    port = _free_loopback_port()
    first = Stack(
        compose, results, "multihost",
        COMPOSE_FILE="docker-compose.yml:docker-compose.publish.yml", BOUQUET_SERVER_PORT=str(port),
        FL_MIN_CLIENTS=str(LOCAL + REMOTE_REPLICAS), FL_ROUNDS="2", FL_RUN_ID="multihost", FL_DATASET="digits", FL_LOCAL_EPOCHS="1",
    )
    token_file = tmp_path / "join-token"  # the first deployment's join token, copied as docs/containers.md says
    second = Stack(
        [*compose, "-f", str(REMOTE)], results, "multihost-remote",
        BOUQUET_SERVER_ADDRESS=f"127.0.0.1:{port}", BOUQUET_CLIENT_NETWORK_MODE="host", BOUQUET_SITE="siteb",
        BOUQUET_JOIN_TOKEN_FILE=str(token_file),
    )

    def logs() -> str:
        return first.logs() + second.logs()

    try:
        first.run("up", "--detach", "--no-build", "--scale", f"client={LOCAL}")
        server = first.run("ps", "-q", "server").stdout.strip()
        published = subprocess.run(["docker", "port", server, "8080/tcp"], capture_output=True, text=True, check=True).stdout.split()
        assert published == [f"127.0.0.1:{port}"], published
        token_file.write_text(first.run("run", "--rm", "--no-deps", "-T", "--entrypoint", "cat", "server", "/secrets/join-token").stdout)
        token_file.chmod(0o444)  # the replicas' user (uid 1000) reads it; docs/containers.md: chgrp 1000 and 0440
        second.run("up", "--detach", "--no-build", "--scale", f"client={REMOTE_REPLICAS}")
        assert_exits_0(server, logs)

        run_dir = results / "multihost"
        summary = json.loads((run_dir / "summary.json").read_text())
        rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        context = f"\n{summary['settled']}\n{json.dumps(summary['partitions'])}\n{logs()}"
        total = LOCAL + REMOTE_REPLICAS
        assert summary["status"] == "completed" and summary["num_partitions"] == total, context
        assert f"({total} connected in all)" in summary["settled"], context
        identities = summary["partitions"]
        remote = sorted(identity for identity in identities if identity.startswith("siteb-"))
        assert len(remote) == REMOTE_REPLICAS and all(re.fullmatch(r"siteb-[0-9a-f]{12}", identity) for identity in remote), context
        assert sorted(identities.values()) == list(range(total)), context
        assert summary["joins_refused"] == 0, context
        for record in rounds:
            assert sorted(c["partition"] for c in record["clients"]) == list(range(total)), context
            assert {c["id"] for c in record["clients"]} == set(identities), context
    finally:
        second.down()
        first.down()
