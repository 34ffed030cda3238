"""App mode's parts without a federation: the token kept out of sight, the assignment file,
settling from the roster, the records of a run, the run's verdict, Bouquet's flwr-clientapp
talking to a node over a real Unix socket, and bad settings refused before anything starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO
from services import roster
from services.appmode import assignment, flower, launch_args, link, records, serverapp_shim, shim
from services.appmode.submit import Submission
from services.settings import LinkSettings, SubmitSettings

ARGV = ["--runtime-api-address", "127.0.0.1:9094", "--token", "s3cret-token", "--insecure", "--parent-pid", "42"]


def test_the_token_is_redacted_and_moved_to_a_file():
    assert "s3cret-token" not in " ".join(launch_args.redact(ARGV))
    assert launch_args.redact(["--token=s3cret-token"]) == ["--token=***"]
    moved = launch_args.with_token_file(ARGV, "/run/token")
    assert "s3cret-token" not in moved and "--token" not in moved and moved[-2:] == ["--token-file", "/run/token"]
    endpoint = launch_args.endpoint(ARGV)
    assert (endpoint.address, endpoint.insecure, endpoint.token) == ("127.0.0.1:9094", True, "s3cret-token")


def test_a_worker_drops_superexecs_parent_pid_which_means_nothing_in_the_pools_pid_namespace():
    argv = ["--runtime-api-address", "10.0.0.5:41234", "--token", "t", "--parent-pid", "17", "--insecure"]
    assert launch_args.without_parent_pid(argv) == ["--runtime-api-address", "10.0.0.5:41234", "--token", "t", "--insecure"]
    assert launch_args.without_parent_pid(["--parent-pid=17", "--insecure"]) == ["--insecure"]


def test_a_node_whose_pool_runs_elsewhere_serves_its_runtime_api_on_its_own_address_else_on_loopback():
    from services.appmode.node import runtime_address
    from services.pool import wire

    here = wire.Facts("id", 1, [], "/slots", socket.gethostname())
    elsewhere = wire.Facts("id", 1, [], "/slots", "another-container")
    assert runtime_address(None).startswith("127.0.0.1:") and runtime_address(here).startswith("127.0.0.1:")
    assert runtime_address(elsewhere).rpartition(":")[0] == socket.gethostbyname(socket.gethostname())


@pytest.mark.integration
def test_a_nodes_runtime_api_gives_nothing_to_a_caller_without_its_secret_or_a_tasks_token(tmp_path):
    """What a pool's worker reaches over the deployment's network: Bouquet's SuperNode command (no
    SuperLink needed: its runtime API serves while it retries), probed as a stranger would."""
    import urllib.error
    import urllib.request

    from services.appmode.launches import NodePlace
    from services.appmode.node import supernode_command, write_secret
    from services.net import free_port
    from services.settings import NodeSettings

    settings = NodeSettings(server_address="127.0.0.1:1", tls_dir=None)
    runtime = f"127.0.0.1:{free_port()}"
    command = supernode_command(settings, NodePlace("client-0", 0, 1), runtime, write_secret(tmp_path), [])
    node = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **flower.OFFLINE, "FLWR_HOME": str(tmp_path / "home")})
    try:
        def status(route: str) -> int:
            request = urllib.request.Request(f"http://{runtime}/v1/runtime/{route}", data=b"", headers={"content-type": "application/protobuf"})
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    return answer.status
            except urllib.error.HTTPError as error:
                return error.code

        deadline = time.monotonic() + 120
        while True:
            try:
                first = status("acquire-task")
                break
            except OSError:
                assert node.poll() is None and time.monotonic() < deadline, "the SuperNode's runtime API never listened"
                time.sleep(0.2)
        routes = ["pull-task-input", "push-task-output", "send-task-heartbeat", "pull-messages", "push-messages", "pull-object", "get-nodes", "create-task"]
        assert {route: status(route) for route in ["acquire-task", *routes]} == {route: 401 for route in ["acquire-task", *routes]}
        assert first == 401
    finally:
        node.kill()
        node.wait()


def test_assignment_round_trips_and_a_broken_file_reads_as_none(tmp_path):
    assert assignment.read(tmp_path) is None
    assignment.write(tmp_path, assignment.Assignment(2, {"a": 0, "b": 1}, ("c",)))
    assert assignment.read(tmp_path) == assignment.Assignment(2, {"a": 0, "b": 1}, ("c",))
    assignment.path(tmp_path).write_text("{not json")
    assert assignment.read(tmp_path) is None


def _link_settings(data_dir: Path, clients: int) -> LinkSettings:
    return LinkSettings(min_clients=clients, join_grace=0.0, data_dir=str(data_dir))


def test_settling_gives_the_started_replicas_distinct_partitions_and_keeps_them_while_they_run(tmp_path):
    held = [roster.announce(tmp_path, name) for name in ("node-a", "node-b", "node-c")]
    registry = link.settle(_link_settings(tmp_path, 3))
    assert sorted(registry.assignments.values()) == [0, 1, 2] and set(registry.assignments) == {"node-a", "node-b", "node-c"}
    link.publish(_link_settings(tmp_path, 3), registry, set())
    again = link.settle(_link_settings(tmp_path, 3))  # the link restarted while its replicas run
    assert again.assignments == registry.assignments
    for entry in held:
        entry.close()
    fresh = [roster.announce(tmp_path, name) for name in ("node-x", "node-y")]  # a new federation
    settled = link.settle(_link_settings(tmp_path, 2))
    assert set(settled.assignments) == {"node-x", "node-y"} and settled.num_partitions == 2
    for entry in fresh:
        entry.close()


def test_the_records_of_a_run_are_its_own(tmp_path):
    log = records.MessageLog(records.node_file(tmp_path, "node-a"))
    log.append({"flwr_run_id": 7, "asked_at": 10.0, "outcome": "ok"})
    log.append({"flwr_run_id": 8, "asked_at": 11.0, "outcome": "ok"})
    log.append({"flwr_run_id": None, "asked_at": 12.0, "outcome": "failed"})  # Flower never handed it a message
    log.append({"flwr_run_id": None, "asked_at": 99.0, "outcome": "failed"})
    chosen = records.of_run(tmp_path, 7, 9.0, 20.0)
    assert [(r["flwr_run_id"], r["asked_at"]) for r in chosen] == [(7, 10.0), (None, 12.0)]


@pytest.fixture
def submission(tmp_path) -> Submission:
    app = tmp_path / "app"
    app.mkdir()
    return Submission(SubmitSettings(app=str(app), results_dir=str(tmp_path / "results"), data_dir=str(tmp_path), run_id="r"))


def test_the_verdict_reads_flowers_status_and_the_messages(submission):
    completed = {"status": "finished:completed", "status-details": "N/A"}
    ok, failed = {"outcome": "ok"}, {"outcome": "app_error", "cause": "ValueError: no data"}
    assert submission.verdict(0, completed, [ok, failed]) is None
    assert "finished:failed" in submission.verdict(0, {"status": "finished:failed", "status-details": "ServerApp import error"}, [])
    assert "every ClientApp message failed (2): ValueError: no data" == submission.verdict(0, completed, [failed, failed])
    assert "did not end within" in submission.verdict(None, None, [])


def test_supernodes_bouquet_did_not_settle_are_counted_and_said(submission, tmp_path, monkeypatch, caplog):
    """Open-source Flower takes any SuperNode that reaches the SuperLink: the submission cannot
    keep one out, but it says so and records how many there were."""
    assignment.write(str(tmp_path), assignment.Assignment(3, {"a": 0, "b": 1, "c": 2}, ()))
    monkeypatch.setattr(submission, "online_nodes", lambda: 4)
    assert submission.wait_for_federation(deadline=time.monotonic() + 30) is None
    assert submission.foreign == 1
    assert "1 SuperNode(s) online that are not among the 3 Bouquet settled" in caplog.text


def test_bouquet_flwr_clientapp_hands_its_argv_to_the_node_and_exits_with_its_outcome(tmp_path):
    launcher = flower.install_program(tmp_path / "bin", "flwr-clientapp", shim.__file__)
    path = str(tmp_path / "node.sock")
    received = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)

        def answer() -> None:
            connection, _ = server.accept()
            with connection, connection.makefile("rwb") as stream:
                received.append(json.loads(stream.readline()))
                stream.write(json.dumps({"exit_code": 7}).encode() + b"\n")

        thread = threading.Thread(target=answer)
        thread.start()
        done = subprocess.run([str(launcher), *ARGV], env={**os.environ, shim.SOCKET_VARIABLE: path}, timeout=30)
        thread.join()
    assert done.returncode == 7
    assert received == [{"argv": ARGV}]
    from services.appmode.refusal import CAUSE_VARIABLE

    assert f'os.environ["{CAUSE_VARIABLE}"]' in launcher.read_text()  # the stdlib-only launcher names it itself


def _serverapp_started(tmp_path: Path, results: Path) -> tuple[Path, list[str]]:
    """Start Bouquet's flwr-serverapp as SuperExec does, with a stand-in for Flower's that tells where it ran."""
    stand_in = tmp_path / "real-flwr-serverapp"
    stand_in.write_text(f"#!{PYTHON}\nimport json, os, sys\nprint(json.dumps([os.getcwd(), sys.argv[1:], os.environ['{serverapp_shim.RUN_FOLDER_VARIABLE}']]))\n")
    stand_in.chmod(0o755)
    launcher = flower.install_program(tmp_path / "bin", "flwr-serverapp", serverapp_shim.__file__)
    env = {**os.environ, serverapp_shim.RESULTS_VARIABLE: str(results), serverapp_shim.COMMAND_VARIABLE: json.dumps([str(stand_in), "--checked"])}
    done = subprocess.run([str(launcher), "--serverappio-api-address", "127.0.0.1:9091", "--token", "t"], env=env, capture_output=True, text=True, timeout=30, check=True)
    folder, argv, run_folder = json.loads(done.stdout)
    assert Path(run_folder) == (Path(folder).parent if Path(folder).name == "serverapp" else Path(folder))  # where the reply checks are recorded
    return Path(folder), argv


def test_the_serverapp_works_in_the_folder_of_the_run_submit_named(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / serverapp_shim.CURRENT_RUN).write_text(f"{results / 'run-7' / 'serverapp'}\n")
    folder, argv = _serverapp_started(tmp_path, results)
    assert folder == results / "run-7" / "serverapp" and folder.is_dir()
    assert argv == ["--checked", "--serverappio-api-address", "127.0.0.1:9091", "--token", "t"]  # the command the link named gets the same arguments


@pytest.mark.parametrize("marker", [None, "", "run-7/serverapp", "{results}/../elsewhere", "{results}"])
def test_a_serverapp_no_submission_named_works_in_a_folder_of_its_own_under_results(tmp_path, marker):
    results = tmp_path / "results"
    results.mkdir()
    if marker is not None:
        (results / serverapp_shim.CURRENT_RUN).write_text(marker.format(results=results))
    folder, _ = _serverapp_started(tmp_path, results)
    assert folder.parent == results / ".flower-runs" and folder.is_dir()


def test_a_message_records_the_installed_packages_its_app_imported_after_the_fork(tmp_path):
    """What FL_WORKER_PRELOAD should name: the packages the app's own modules import, of those the
    warm process had not; not the app's modules, not the standard library."""
    (tmp_path / "my_app.py").write_text("import csv\nimport threadpoolctl\nfrom my_helper import x\n")
    (tmp_path / "my_helper.py").write_text("x = 1\n")
    probe = ("import sys, json; from services.appmode.clientapp import imported_after_fork; warm = set(sys.modules); "
             f"sys.path.insert(0, {str(tmp_path)!r}); import my_app; print(json.dumps(imported_after_fork(set(sys.modules), warm)))")
    done = subprocess.run([PYTHON, "-c", probe], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60, check=True)
    found = json.loads(done.stdout)
    assert found["app_imports_after_fork"] == ["threadpoolctl"]
    assert "threadpoolctl" in found["imported_after_fork"] and not {"csv", "my_app", "my_helper"} & set(found["imported_after_fork"])


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *argv], cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_app_mode_without_an_app_is_refused_naming_the_setting():
    done = _run("scripts/run_local.py", "--mode", "app", "--clients", "2")
    assert done.returncode == 2 and "FL_APP" in done.stderr


def test_a_folder_that_is_no_flower_app_is_refused(tmp_path):
    done = _run("scripts/run_local.py", "--app", str(tmp_path), "--clients", "2")
    assert done.returncode == 2 and "not a Flower App folder" in done.stderr


def test_a_run_id_whose_folder_holds_a_finished_run_is_refused(tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text('{"status": "completed"}')
    done = _run("-m", "services.appmode.submit", "--app", str(REPO / "examples" / "quickstart-app"), "--results-dir", str(tmp_path), "--run-id", "done")
    assert done.returncode == 2 and "FL_RUN_ID" in done.stderr and "never touched" in done.stderr
    assert (tmp_path / "done" / "summary.json").read_text() == '{"status": "completed"}'


def test_a_second_submission_at_once_is_refused(tmp_path):
    from services.appmode.submit import ONE_AT_A_TIME
    from services.locks import HeldLock

    running = HeldLock(tmp_path / ONE_AT_A_TIME)
    assert running.acquire()
    try:
        done = _run("-m", "services.appmode.submit", "--app", str(REPO / "examples" / "quickstart-app"), "--results-dir", str(tmp_path), "--run-id", "second")
    finally:
        running.release()
    assert done.returncode == 1 and "another submission is running" in done.stderr
    assert not (tmp_path / "second").exists()  # nothing half-started


def test_a_node_refuses_inprocess_workers():
    done = _run("-m", "services.appmode.node", "--worker-start", "inprocess")
    assert done.returncode == 2 and "FL_WORKER_START" in done.stderr


def test_rounds_are_written_for_the_memory_sidecar_from_flowers_round_lines_and_the_messages(tmp_path):
    from services.appmode.rounds import RoundStart, round_lines, rounds_completed, write_rounds
    from services.monitor.rounds import RoundLog

    message = {"node": "n", "partition": 0, "num_partitions": 2, "pid": 5, "device": "cpu", "slots": 2, "outcome": "ok"}
    messages = [{**message, "message_type": "train", "asked_at": 10.0, "ended_at": 12.0, "worker_started_at": 10.5, "worker_ended_at": 11.5},
                {**message, "message_type": "evaluate", "asked_at": 10.5, "ended_at": 12.5, "worker_started_at": 10.6, "worker_ended_at": 11.6},
                {**message, "message_type": "train", "asked_at": 21.0, "ended_at": 25.0, "worker_started_at": 21.5, "worker_ended_at": 24.0, "outcome": "app_error"},
                {**message, "message_type": "evaluate", "node": "m", "partition": 1, "asked_at": 21.0, "ended_at": 25.0, "worker_started_at": 21.5, "worker_ended_at": 24.0}]
    written = round_lines([RoundStart(1, 9.0), RoundStart(2, 20.0)], messages, 30.0)
    write_rounds(tmp_path, written)
    assert rounds_completed(written) == 1  # round 2's only train message failed: nobody trained in it
    rounds = RoundLog(tmp_path / "metrics.jsonl").refresh()
    assert [(r.number, r.started, r.ended) for r in rounds] == [(1, 9.0, 20.0), (2, 20.0, 30.0)]
    # clients counted as task mode counts them (nodes), the messages apart
    assert [(r.record["clients_ok"], r.record["clients_failed"]) for r in rounds] == [(1, 0), (1, 1)]
    assert [(r.record["messages_ok"], r.record["messages_failed"]) for r in rounds] == [(2, 0), (1, 1)]
    assert rounds[0].record["num_partitions"] == 2
    assert rounds[0].record["clients"][0]["id"] == "n" and rounds[0].record["concurrent_workers_peak"] == {"cpu": 2}  # train and evaluate overlapped


def test_the_serverapps_central_evaluations_are_read_from_flowers_log(tmp_path):
    """As Flower 1.42's FedAvg logs them (colour codes and tree drawing included)."""
    from services.appmode import evaluations
    from services.appmode.rounds import RoundStart, round_lines, write_rounds
    from services.monitor.rounds import RoundLog

    log = (
        "\x1b[92mINFO \x1b[0m:      Initial global evaluation results: {'accuracy': 0.1, 'loss': 2.30}\n"
        "\x1b[92mINFO \x1b[0m:      [ROUND 1/2]\n"
        "\x1b[92mINFO \x1b[0m:      \t\u2514\u2500\u2500> Aggregated MetricRecord: {'train_loss': 2.2}\n"
        "\x1b[92mINFO \x1b[0m:      Global evaluation\n"
        "\x1b[92mINFO \x1b[0m:      \t\u2514\u2500\u2500> MetricRecord: {'accuracy': 0.25, 'loss': 2.1}\n"
        "\x1b[92mINFO \x1b[0m:      [ROUND 2/2]\n"
        "\x1b[92mINFO \x1b[0m:      Global evaluation\n"
        "\x1b[92mINFO \x1b[0m:      \t\u2514\u2500\u2500> MetricRecord: {'accuracy': 0.5, 'loss': 1.7, 'note': 'x'}\n"
    )
    central = evaluations.read(log)
    assert central.initial == {"accuracy": 0.1, "loss": 2.30}
    assert central.by_round == {1: {"accuracy": 0.25, "loss": 2.1}, 2: {"accuracy": 0.5, "loss": 1.7}}  # the train aggregate is not one
    assert evaluations.read("no evaluation at all").by_round == {}
    message = {"node": "n", "partition": 0, "pid": 5, "device": "cpu", "slots": 2, "outcome": "ok", "ended_at": 12.0}
    write_rounds(tmp_path, round_lines([RoundStart(1, 9.0), RoundStart(2, 20.0)], [{**message, "asked_at": 10.0}, {**message, "asked_at": 21.0}], 30.0, central))
    assert [r.record.get("accuracy") for r in RoundLog(tmp_path / "metrics.jsonl").refresh()] == [0.25, 0.5]


def test_the_serverapps_reply_checks_are_merged_into_the_messages_of_the_run(tmp_path):
    """A refused reply makes its node's message "refused" with the reason; a measured one gets its
    distance; a reply from a SuperNode Bouquet did not start gets a line of its own; rounds count
    a node whose reply was refused as rejected, as task mode does."""
    from services.appmode.rounds import RoundStart, round_lines

    base = {"partition": 0, "num_partitions": 2, "flwr_run_id": 7, "outcome": "ok", "cause": None, "ended_at": 12.0}
    messages = [{**base, "node": "a", "message_id": "m1", "message_type": "train", "asked_at": 10.0},
                {**base, "node": "b", "partition": 1, "message_id": "m2", "message_type": "train", "asked_at": 10.1}]
    checks = [{"message_id": "m1", "flwr_node_id": 11, "flwr_run_id": 7, "message_type": "train", "checked_at": 11.0, "refused": "ArrayRecord 'arrays': array 'w': shape (4,), expected (3,)"},
              {"message_id": "m2", "flwr_node_id": 12, "flwr_run_id": 7, "message_type": "train", "checked_at": 11.1, "update_norm": 1.0, "clipped_from_norm": 3.5},
              {"message_id": "m9", "flwr_node_id": 99, "flwr_run_id": 7, "message_type": "train", "checked_at": 11.2, "refused": "MetricRecord 'metrics': num-examples 0, expected a positive integer"}]
    merged = records.with_reply_checks(messages, checks)
    assert [(r["node"], r["partition"], r["outcome"]) for r in merged] == [("a", 0, "refused"), ("b", 1, "ok"), ("flower-node-99", None, "refused")]
    assert merged[0]["reason"] == checks[0]["refused"] and "shape (4,)" in merged[0]["cause"]
    assert merged[1]["update_norm"] == 1.0 and merged[1]["clipped_from_norm"] == 3.5
    assert messages[0]["outcome"] == "ok"  # the node's own records are left as they were
    line, = round_lines([RoundStart(1, 9.0)], merged, 20.0)
    assert (line["clients_ok"], line["clients_failed"], line["clients_rejected"], line["messages_rejected"]) == (1, 0, 2, 2)
    assert line["rejected"][0] == {"id": "a", "partition": 0, "message_type": "train", "reason": checks[0]["refused"]}
