"""Bouquet on Docker Swarm (deploy/swarm/, docs/swarm.md).

Fast checks (no Docker daemon): the stack files against the Compose spec and through the docker
CLI's own loader (`docker stack config`, where the CLI has it), the settings they pass, and the
per-host record of a round.

The test marked ``docker`` runs the stack on three Docker hosts made on this machine by
scripts/swarm_local.sh (as docs/swarm.md has a user do): 6 replicas over the 2 worker hosts,
rounds 1-3 with every partition, then worker host 3 stopped while every replica is inside its
round-4 training (tests/tasks/gated_after_round_3.py holds them there): its replicas are recorded
failed in round 4 with the cause, Swarm reschedules them on host 2 under the same identities, and
round 5 trains all 6 partitions again. It skips without root, Docker or the images, unless
BOUQUET_REQUIRE_DOCKER=1 (CI sets it): then it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from services import settings
from services.server.results import RoundRecorder
from swarm_hosts import LocalSwarm, unavailable_reason

REPO = Path(__file__).resolve().parent.parent
STACK = REPO / "deploy" / "swarm" / "bouquet.yml"
GPU = REPO / "deploy" / "swarm" / "gpu.yml"
TLS = REPO / "deploy" / "swarm" / "tls.yml"
OVERLAYS = (GPU, TLS)
REPLICAS, ROUNDS, STOPPED_NODE = 6, 5, 3


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# --- fast checks -------------------------------------------------------------------------------


def test_stack_files_are_valid_against_the_compose_spec() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(STACK), *map(str, OVERLAYS)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _stack_config(*files: Path, **env: str) -> dict:
    """The stack as `docker stack config` renders it: the docker CLI's own loader and schema
    (what `docker stack deploy` runs first), offline."""
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed")
    probe = subprocess.run(["docker", "stack", "config", "--help"], capture_output=True, text=True)
    if probe.returncode != 0 or "Outputs the final config file" not in probe.stdout:
        pytest.skip("this docker CLI has no `docker stack config` (20.10's has not; the Swarm test's deploy validates the files)")
    result = subprocess.run(
        ["docker", "stack", "config", *(arg for path in files for arg in ("-c", str(path)))],
        capture_output=True, text=True, env={**os.environ, "DOCKER_HOST": "unix:///nonexistent", **env}, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return yaml.safe_load(result.stdout)


def test_docker_stack_config_accepts_the_stack_and_its_overlays() -> None:
    stack = _stack_config(STACK, BOUQUET_REPLICAS="4", FL_ROUNDS="7")["services"]
    server, client = stack["server"], stack["client"]
    assert server["deploy"]["placement"]["constraints"] == ["node.role == manager"]
    assert client["deploy"]["placement"]["constraints"] == ["node.role == worker"]
    assert client["deploy"]["replicas"] == 4
    # The federation's size is the replica count: settled without a roster shared between hosts.
    assert server["environment"]["FL_MIN_CLIENTS"] == server["environment"]["FL_MIN_FIT_CLIENTS"] == "4"
    assert server["environment"]["FL_JOIN_GRACE"] == "0" and server["environment"]["FL_ROUNDS"] == "7"
    # Identity from the task's slot, which Swarm keeps when it reschedules the replica.
    assert client["hostname"] == "client-{{.Task.Slot}}" and "FL_CLIENT_ID" not in client["environment"]
    assert client["environment"]["FL_HOST_NAME"] == "{{.Node.Hostname}}"
    for service in (server, client):
        assert service["environment"]["FL_WORKER_POOL"] == "replica"
        assert service["environment"]["FL_JOIN_TOKEN_FILE"] == "/run/secrets/bouquet-join-token"
        assert [secret["source"] for secret in service["secrets"]] == ["bouquet-join-token"]
        assert "ports" not in service
    gpu = _stack_config(STACK, GPU)["services"]
    reservation = gpu["client"]["deploy"]["resources"]["reservations"]["generic_resources"]
    assert reservation == [{"discrete_resource_spec": {"kind": "NVIDIA-GPU", "value": 1}}]
    assert gpu["client"]["image"] == "bouquet/client:gpu"
    tls = _stack_config(STACK, TLS)["services"]
    assert tls["server"]["environment"]["FL_TLS_DIR"] == tls["client"]["environment"]["FL_TLS_DIR"] == "/run/secrets/tls"
    assert {secret.get("target") for secret in tls["server"]["secrets"]} >= {"tls/ca.crt", "tls/server.crt", "tls/server.key"}
    assert {secret.get("target") for secret in tls["client"]["secrets"]} >= {"tls/ca.crt"}
    assert "tls/server.key" not in {secret.get("target") for secret in tls["client"]["secrets"]}


def test_stack_passes_only_settings_the_programs_know() -> None:
    """A misspelt FL_* name would be passed and silently ignored."""
    known = {"server": {s.env for s in settings.SERVER}, "client": {s.env for s in settings.CLIENT}}
    for path in (STACK, *OVERLAYS):
        for name, service in _load(path)["services"].items():
            env = service.get("environment", {})
            unknown = {key for key in env if key.startswith("FL_")} - known[name]
            assert not unknown, f"{path.name}: {name}: {sorted(unknown)} are not settings of services.{name}"


def test_a_bad_host_name_is_refused_naming_the_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.client"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "FL_HOST_NAME": "two words"}, cwd=REPO,
    )
    assert result.returncode == settings.EXIT_BAD_SETTING
    assert "FL_HOST_NAME" in result.stderr and "'two words'" in result.stderr


def test_partitions_by_host_lists_each_rounds_hosts(tmp_path: Path) -> None:
    class Folder:
        def append_round(self, record: dict) -> None:
            pass

    recorder = RoundRecorder(Folder())  # type: ignore[arg-type]
    for server_round, clients in ((1, [("a", 1), ("b", 0), ("a", 2)]), (2, [("a", 0)]), (3, [(None, 0)])):
        recorder.round_started(server_round)
        entries = [{"partition": partition, **({"host": host} if host else {})} for host, partition in clients]
        recorder.fit_finished(entries, [], 3)
        recorder.commit(recorder.round_ended())
    assert recorder.partitions_by_host() == {"1": {"a": [1, 2], "b": [0]}, "2": {"a": [0]}}


# --- three Docker hosts ------------------------------------------------------------------------


def _unavailable(reason: str) -> None:
    if os.environ.get("BOUQUET_REQUIRE_DOCKER") == "1":
        pytest.fail(f"BOUQUET_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(reason)


def _wait(what: str, ready, timeout: float, logs=lambda: "", poll: float = 0.5):
    """Poll ``ready()`` until it returns something true; its value. Fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:g} s\n{logs()}")
        time.sleep(poll)


def _rounds(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


TEST_OVERLAY = """\
version: "3.8"
services:
  server:
    environment:
      FL_TASK: /task/gated_after_round_3.py
      FL_LOCAL_EPOCHS: "1"
    volumes:
      - {tasks}:/task:ro
  client:
    environment:
      BOUQUET_TEST_GATE: /gate
    volumes:
      - {tasks}:/task:ro
      - {gate}:/gate
"""


@pytest.mark.docker
@pytest.mark.timeout(1200)
def test_six_replicas_on_two_worker_hosts_survive_the_loss_of_one(tmp_path: Path) -> None:
    tag = os.environ.get("BOUQUET_SWARM_TEST_TAG", "cpu")  # a variant built with --tag, e.g. while developing
    images = [f"bouquet/server:{tag}", f"bouquet/client:{tag}"]
    reason = unavailable_reason(images)
    if reason:
        _unavailable(reason)
    results, gate = tmp_path / "results", tmp_path / "gate"
    results.mkdir()
    gate.mkdir()
    gate.chmod(0o777)  # the replicas run as bouquet (uid 1000)
    overlay = tmp_path / "test-overlay.yml"
    overlay.write_text(TEST_OVERLAY.format(tasks=REPO / "tests" / "tasks", gate=gate))
    run = results / "swarm-test"
    swarm = LocalSwarm(images)
    measured: dict[str, object] = {}
    try:
        measured["hosts_up_seconds"] = round(swarm.up(), 1)
        workers = {node: f"{swarm.prefix}-n{node}" for node in (2, 3)}
        swarm.docker(1, "secret", "create", "bouquet-join-token", "-", input=os.urandom(24).hex())
        deploy_env = {
            **os.environ, "BOUQUET_REPLICAS": str(REPLICAS), "FL_ROUNDS": str(ROUNDS), "FL_RUN_ID": run.name,
            # A slot for each of a worker host's 3 replicas: the gate holds every training of
            # round 4 at once (with fewer, the last would wait for a slot the held ones keep).
            "FL_TORCH_THREADS": "1", "FL_WORKER_SLOTS": str(REPLICAS // 2), "FL_JOIN_TIMEOUT": "300", "BOUQUET_RESULTS_DIR": str(results),
            "BOUQUET_SERVER_IMAGE": images[0], "BOUQUET_CLIENT_IMAGE": images[1],
        }
        deployed = time.monotonic()
        swarm.docker(1, "stack", "deploy", "-c", str(STACK), "-c", str(overlay), "bouquet", env=deploy_env)

        def logs() -> str:
            return "\n".join([*swarm.log[-2:], swarm.service_logs("bouquet_server"), swarm.service_logs("bouquet_client", 40)])

        # Rounds 1-3 recorded, and every replica inside its round-4 training (held by the gate).
        _wait("rounds 1-3 recorded", lambda: len(_rounds(run)) >= 3, 480, logs)
        _wait("all 6 replicas in their 4th training", lambda: len(list(gate.glob("*-training-4"))) == REPLICAS, 240, logs)
        measured["to_round_3_seconds"] = round(time.monotonic() - deployed, 1)
        before = _rounds(run)[:3]
        kept_lines = (run / "metrics.jsonl").read_text().splitlines()[:3]
        kept_checkpoints = sorted(path.name for path in (run / "checkpoints").iterdir())
        for record in before:
            assert record["clients_ok"] == REPLICAS and not record["failures"] and not record["missing"], record
            hosts = {client["host"] for client in record["clients"]}
            assert hosts == set(workers.values()), f"round {record['round']} ran on {hosts}"
            assert sorted(client["partition"] for client in record["clients"]) == list(range(REPLICAS))
        holder = {client["id"]: client["partition"] for client in before[0]["clients"]}
        assert sorted(holder) == [f"client-{slot}" for slot in range(1, REPLICAS + 1)]
        for record in before[1:]:  # each identity keeps its partition
            assert {client["id"]: client["partition"] for client in record["clients"]} == holder
        on_stopped = {client["id"] for client in before[2]["clients"] if client["host"] == workers[STOPPED_NODE]}
        assert len(on_stopped) == REPLICAS // 2, "the replicas are spread evenly over the two workers"

        swarm.stop_host(STOPPED_NODE)
        _wait(f"the manager to mark {workers[STOPPED_NODE]} down", lambda: swarm.node_state(workers[STOPPED_NODE]) == "down", 120, logs)
        (gate / "open").touch()
        summary_path = run / "summary.json"
        _wait("the run to end (summary.json)", summary_path.exists, 480, logs)
        summary = json.loads(summary_path.read_text())
        rounds = _rounds(run)
        measured["run_seconds"] = round(time.monotonic() - deployed, 1)
        measured["round_seconds"] = {record["round"]: record["round_seconds"] for record in rounds}
        measured["partitions_by_host"] = summary["partitions_by_host"]
        measured["round_4_failures"] = rounds[3]["failures"] if len(rounds) > 3 else None
        print(f"\nswarm test measurements: {json.dumps(measured, indent=1)}")

        assert summary["status"] == "completed", summary
        assert summary["rounds_completed"] == ROUNDS and [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
        assert summary["num_partitions"] == REPLICAS and "FL_MIN_CLIENTS = 6" in summary["settled"]
        by_host = summary["partitions_by_host"]
        for server_round in ("1", "2", "3"):
            assert by_host[server_round] == {workers[2]: by_host[server_round][workers[2]], workers[3]: by_host[server_round][workers[3]]}
            assert sorted(by_host[server_round][workers[2]] + by_host[server_round][workers[3]]) == list(range(REPLICAS))
        # Round 4: the stopped host's replicas failed, each with its cause; the others trained.
        fourth = rounds[3]
        assert {failure["id"] for failure in fourth["failures"]} == on_stopped, fourth["failures"]
        assert all("its connection was lost" in failure["cause"] for failure in fourth["failures"]), fourth["failures"]
        assert {client["id"] for client in fourth["clients"]} == set(holder) - on_stopped
        assert by_host["4"] == {workers[2]: sorted(holder[identity] for identity in set(holder) - on_stopped)}
        for identity in on_stopped:
            assert summary["rounds_missed_by_partition"][str(holder[identity])] == {"missed": 1, "failed": 1}
        # Round 5: rescheduled on host 2 under the same identities, so with the same partitions.
        assert by_host["5"] == {workers[2]: list(range(REPLICAS))}
        assert {client["id"]: client["partition"] for client in rounds[4]["clients"]} == holder == summary["partitions"]
        # Swarm's own record: each of those slots has a task on host 2 now (`service ps` history).
        tasks = swarm.tasks("bouquet_client")
        slots_on_2 = {task["Name"].lstrip("\\_ ") for task in tasks if task["Node"] == workers[2]}
        assert {f"bouquet_client.{identity.split('-')[1]}" for identity in on_stopped} <= slots_on_2, tasks
        # Nothing in the run folder was lost when the host went.
        assert (run / "metrics.jsonl").read_text().splitlines()[:3] == kept_lines
        checkpoints = sorted(path.name for path in (run / "checkpoints").iterdir())
        assert set(kept_checkpoints) <= set(checkpoints) and f"round-{ROUNDS:04d}.npz" in checkpoints
        _wait("the server's task to complete", lambda: any(t["CurrentState"].startswith("Complete") for t in swarm.tasks("bouquet_server")), 60, logs)
    finally:
        swarm.down()
        left = swarm.leftovers()
        assert not left, f"swarm_local.sh down left {left}\n" + "\n".join(swarm.log[-1:])
