"""Trackers against real servers on loopback, fed by a real local federation (server + clients
over gRPC, digits): MLflow's ``mlflow server`` read back through MLflow's REST API, a tracking
server stopped mid-run, TensorBoard's event files, Debian's Prometheus through its HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO
from services.files import read_rounds
from trackers import MlflowServer, Prometheus, free_port, needs, wait_for

pytestmark = pytest.mark.integration

EXPERIMENT = "bouquet-it"


def federation(results: Path, run_id: str, data_dir: Path, rounds: int, *extra: str, env: dict[str, str] | None = None) -> list[str]:
    return [PYTHON, "scripts/run_local.py", "--clients", "3", "--rounds", str(rounds), "--dataset", "digits", "--local-epochs", "1",
            "--results-dir", str(results), "--run-id", run_id, "--data-dir", str(data_dir), *extra]


def launch(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    process = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    out.close()
    return process


def event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard log folder's event files (TFRecord framing: length, its CRC,
    the Event proto, its CRC), read with the Event proto tensorboardX ships."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = needs(lambda: MlflowServer(tmp_path_factory.mktemp("mlflow"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def recorded(mlflow_server, tmp_path_factory):
    """A 3-client, 3-round federation with MLFLOW_TRACKING_URI set and the memory monitor on."""
    results = tmp_path_factory.mktemp("results")
    done = subprocess.run(
        federation(results, "tracked", tmp_path_factory.getbasetemp() / "data", 3, "--monitor"),
        cwd=REPO, capture_output=True, text=True, timeout=420,
        env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": mlflow_server.uri, "FL_MLFLOW_EXPERIMENT": EXPERIMENT},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return results / "tracked"


def test_every_round_is_in_mlflow_as_the_run_folder_has_it(mlflow_server, recorded):
    rounds = read_rounds(recorded)
    summary = json.loads((recorded / "summary.json").read_text())
    state = json.loads((recorded / "state.json").read_text())
    run = mlflow_server.run_of(EXPERIMENT, "tracked")
    assert run is not None and run["info"]["status"] == "FINISHED"
    run_id = run["info"]["run_id"]
    assert json.loads((recorded / "tracking.json").read_text())["mlflow"]["run_id"] == run_id
    accuracy = mlflow_server.history(run_id, "accuracy")
    assert accuracy == {0: state["initial"]["accuracy"], **{r["round"]: r["accuracy"] for r in rounds}}
    assert mlflow_server.history(run_id, "clients_ok") == {1: 3.0, 2: 3.0, 3: 3.0}
    assert set(mlflow_server.history(run_id, "round_seconds")) == {1, 2, 3}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["strategy"] == "fedavg" and params["rounds"] == "3" and params["num_partitions"] == "3"
    assert params["task.sha256"] == summary["task"]["sha256"] and params["version.flwr"] == "1.42.0"
    assert params["version.torch"] == "2.15.0" and params["engine_mode"].startswith("task")
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["bouquet.status"] == "completed"
    experiment = mlflow_server.api("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]  # the UI's model-training view


def test_the_run_folders_files_are_mlflow_artifacts(mlflow_server, recorded):
    run_id = mlflow_server.run_of(EXPERIMENT, "tracked")["info"]["run_id"]
    artifacts = mlflow_server.artifacts(run_id)
    assert {"summary.json", "metrics.jsonl", "state.json", "checkpoints", "tensorboard"} <= set(artifacts)
    assert mlflow_server.artifacts(run_id, "checkpoints") == ["checkpoints/round-0003.npz"]
    # the memory monitor's, written after the server ended, sent by the monitor
    assert {"memory.csv", "memory_summary.json", "report.html"} <= set(artifacts), artifacts
    memory = json.loads((recorded / "memory_summary.json").read_text())
    assert mlflow_server.history(run_id, "memory_residual_mib") == {r["round"]: r["residual_mib"] for r in memory["rounds"]}
    tags = {t["key"]: t["value"] for t in mlflow_server.run_of(EXPERIMENT, "tracked")["data"]["tags"]}
    assert tags["bouquet.memory_verdict"] == memory["verdict"]["text"]


def test_tensorboard_event_files_in_the_run_folder_hold_every_round(recorded):
    rounds = read_rounds(recorded)
    scalars = event_scalars(recorded / "tensorboard")
    assert sorted(step for step, _ in scalars["accuracy"]) == [0, 1, 2, 3], "a step is missing or written twice"
    accuracy, clients_ok = dict(scalars["accuracy"]), dict(scalars["clients_ok"])
    for record in rounds:
        assert accuracy[record["round"]] == pytest.approx(record["accuracy"], rel=1e-6)
        assert clients_ok[record["round"]] == record["clients_ok"]


def test_sending_again_adds_nothing_and_a_lost_run_id_finds_the_same_mlflow_run(mlflow_server, recorded, tmp_path):
    """``python -m services.tracking`` on a sent run sends nothing twice; a run folder whose
    tracking.json lost the MLflow run's id (the answer to its creation was lost) finds it by tag."""
    copy = tmp_path / "tracked"
    shutil.copytree(recorded, copy)
    progress = json.loads((copy / "tracking.json").read_text())
    run_id = progress["mlflow"]["run_id"]
    before = mlflow_server.history(run_id, "accuracy")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": mlflow_server.uri}
    again = subprocess.run([PYTHON, "-m", "services.tracking", str(copy)], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "sent 0 round(s)" in again.stderr
    del progress["mlflow"]["run_id"]
    (copy / "tracking.json").write_text(json.dumps(progress))
    found = subprocess.run([PYTHON, "-m", "services.tracking", str(copy)], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert found.returncode == 0, found.stderr
    assert json.loads((copy / "tracking.json").read_text())["mlflow"]["run_id"] == run_id
    assert mlflow_server.run_of(EXPERIMENT, "tracked")["info"]["run_id"] == run_id  # still one MLflow run
    assert mlflow_server.history(run_id, "accuracy") == before


def test_sending_without_a_tracking_uri_is_a_bad_setting(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    (tmp_path / "metrics.jsonl").write_text("")  # a run folder never sent to MLflow
    done = subprocess.run([PYTHON, "-m", "services.tracking", str(tmp_path)], cwd=REPO, capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "MLFLOW_TRACKING_URI" in done.stderr


def test_a_tracking_server_down_mid_run_neither_fails_nor_stops_the_federation(tmp_path_factory):
    """The tracking server is stopped once round 1 reached it and started again (same port, same
    database) only after round 3 is recorded: the federation trains every round meanwhile, the
    server logs the failure once, and every round arrives in MLflow by the end."""
    mlflow = needs(lambda: MlflowServer(tmp_path_factory.mktemp("mlflow-down"))).start()
    results = tmp_path_factory.mktemp("results-down")
    rounds = 5
    process = launch(
        federation(results, "outage", tmp_path_factory.getbasetemp() / "data", rounds),
        # the flush may wait for the tracking server's restart, which a loaded machine makes slow
        {"MLFLOW_TRACKING_URI": mlflow.uri, "FL_MLFLOW_EXPERIMENT": EXPERIMENT, "FL_TRACKING_FLUSH_TIMEOUT": "300"},
        results / "launcher.log",
    )
    try:
        run = wait_for(lambda: mlflow.run_of(EXPERIMENT, "outage"), 300, "the run in MLflow")
        wait_for(lambda: 1 in mlflow.history(run["info"]["run_id"], "accuracy"), 300, "round 1 in MLflow")
        mlflow.stop()
        wait_for(lambda: len(read_rounds(results / "outage")) >= 3, 300, "round 3 recorded while MLflow is down")
        assert process.poll() is None, "the federation ended while the tracking server was down"
        mlflow.start()
        assert process.wait(420) == 0, (results / "launcher.log").read_text()[-3000:]
        recorded = read_rounds(results / "outage")
        assert [r["round"] for r in recorded] == list(range(1, rounds + 1))
        run = mlflow.run_of(EXPERIMENT, "outage")
        assert run["info"]["status"] == "FINISHED"
        assert mlflow.history(run["info"]["run_id"], "accuracy") == {
            0: json.loads((results / "outage" / "state.json").read_text())["initial"]["accuracy"],
            **{r["round"]: r["accuracy"] for r in recorded},
        }
        log = (results / "outage" / "logs" / "server.log").read_text()
        assert log.count("cannot be reached") == 1, log[-3000:]
        assert "answers again" in log
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(60)
        mlflow.stop()


def test_prometheus_reads_the_round_figures_of_a_running_federation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    prometheus = needs(lambda: Prometheus(folder, [f"127.0.0.1:{port}"]))
    results = tmp_path_factory.mktemp("results-prom")
    process = launch(
        federation(results, "scraped", tmp_path_factory.getbasetemp() / "data", 6, "--server-metrics-port", str(port)),
        {}, results / "launcher.log",
    )
    try:
        def a_scraped_round():
            # one query: the round and its figures from the same scrape
            found = {r["metric"]["__name__"] + r["metric"].get("outcome", ""): float(r["value"][1])
                     for r in prometheus.query('{__name__=~"bouquet_server_(round|accuracy|loss|round_clients)"}')}
            return found if found.get("bouquet_server_round", 0) >= 2 else None

        figures = wait_for(a_scraped_round, 300, "round 2 in Prometheus")
        assert process.poll() is None, "the federation was over before Prometheus read round 2"
        record = next(r for r in read_rounds(results / "scraped") if r["round"] == figures["bouquet_server_round"])
        assert figures["bouquet_server_accuracy"] == pytest.approx(record["accuracy"])
        assert figures["bouquet_server_loss"] == pytest.approx(record["loss"])
        assert figures["bouquet_server_round_clientsok"] == 3 and figures["bouquet_server_round_clientsfailed"] == 0
        # the Grafana dashboard's queries are valid PromQL, and the server's have data
        dashboard = json.loads((REPO / "deploy" / "grafana" / "bouquet-dashboard.json").read_text())
        for panel in dashboard["panels"]:
            expression = panel["targets"][0]["expr"]
            answer = prometheus.query(expression)  # an invalid query is an HTTP error
            if expression.startswith("bouquet_server_"):
                assert answer, f"{panel['title']}: {expression} has no data"
        assert process.wait(420) == 0, (results / "launcher.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(60)
        prometheus.stop()


def test_a_resumed_run_continues_the_same_mlflow_run(mlflow_server, tmp_path):
    """The server is stopped (SIGTERM: the MLflow run ends KILLED) once round 2 is on disk and
    started again with the same command: the run resumes (FL_RESUME=auto) into the same MLflow
    run, which ends FINISHED with each round once."""
    from services.net import wait_until_listening

    address = f"127.0.0.1:{free_port()}"
    results, data, logs = tmp_path / "results", tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": mlflow_server.uri, "FL_MLFLOW_EXPERIMENT": EXPERIMENT}
    command = [PYTHON, "-m", "services.server", "--listen-address", address, "--rounds", "4", "--min-clients", "3", "--join-grace", "0",
               "--min-fit-clients", "3", "--dataset", "digits", "--local-epochs", "1", "--torch-threads", "1", "--run-id", "resumed",
               "--results-dir", str(results), "--data-dir", str(data)]
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=open(logs / "server-1.log", "w"), stderr=subprocess.STDOUT)
    clients: list[subprocess.Popen] = []
    try:
        wait_until_listening(address, server, timeout=120, name="server")
        for index in range(3):
            clients.append(subprocess.Popen(
                [PYTHON, "-m", "services.client", "--server-address", address, "--client-id", f"client-{index}", "--data-dir", str(data), "--torch-threads", "1"],
                cwd=REPO, env=env, stdout=open(logs / f"client-{index}.log", "w"), stderr=subprocess.STDOUT,
            ))
        wait_for(lambda: len(read_rounds(results / "resumed")) >= 2 if (results / "resumed").exists() else False, 300, "round 2 on disk")
        server.terminate()
        assert server.wait(120) != 0
        first = mlflow_server.run_of(EXPERIMENT, "resumed")
        assert first["info"]["status"] == "KILLED"
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=open(logs / "server-2.log", "w"), stderr=subprocess.STDOUT)
        assert server.wait(300) == 0, (logs / "server-2.log").read_text()[-3000:]
    finally:
        for process in (server, *clients):
            process.kill()
            process.wait()
    run = mlflow_server.run_of(EXPERIMENT, "resumed")  # still one MLflow run for the Bouquet run
    assert run["info"]["run_id"] == first["info"]["run_id"] and run["info"]["status"] == "FINISHED"
    rounds = read_rounds(results / "resumed")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    points = mlflow_server.api("metrics/get-history", run_id=run["info"]["run_id"], metric_key="accuracy")["metrics"]
    assert sorted(int(p["step"]) for p in points) == [0, 1, 2, 3, 4], "a round is missing or sent twice"
    assert {int(p["step"]): p["value"] for p in points if int(p["step"]) > 0} == {r["round"]: r["accuracy"] for r in rounds}


def test_an_app_mode_run_is_in_mlflow_and_tensorboard_with_bouquets_figures(mlflow_server, tmp_path):
    """App mode (a Flower App on the Deployment Engine): submit sends the run folder at the run's
    end, the ServerApp's accuracy per round and what Bouquet knows of the messages (workers, slots)."""
    done = subprocess.run(
        [PYTHON, "scripts/run_local.py", "--app", "examples/quickstart-app", "--clients", "2", "--app-run-config", "num-server-rounds=2",
         "--results-dir", str(tmp_path / "results"), "--data-dir", str(tmp_path / "data"), "--run-id", "app-tracked"],
        cwd=REPO, capture_output=True, text=True, timeout=420,
        env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": mlflow_server.uri, "FL_MLFLOW_EXPERIMENT": EXPERIMENT},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = tmp_path / "results" / "app-tracked"
    rounds = read_rounds(folder)
    run = mlflow_server.run_of(EXPERIMENT, "app-tracked")
    assert run is not None and run["info"]["status"] == "FINISHED"
    run_id = run["info"]["run_id"]
    assert mlflow_server.history(run_id, "accuracy") == {r["round"]: r["accuracy"] for r in rounds} and len(rounds) == 2
    assert mlflow_server.history(run_id, "clients_ok") == {1: 2.0, 2: 2.0}  # nodes, as task mode counts clients
    assert mlflow_server.history(run_id, "messages_ok") == {r["round"]: float(r["messages_ok"]) for r in rounds}
    assert {p["key"]: p["value"] for p in mlflow_server.run_of(EXPERIMENT, "app-tracked")["data"]["params"]}["num_partitions"] == "2"
    assert set(mlflow_server.history(run_id, "workers_peak")) == {1, 2} and set(mlflow_server.history(run_id, "slot_wait_seconds_max")) == {1, 2}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["engine_mode"].startswith("app") and params["app.name"] == "quickstart-app" and params["app.config.num-server-rounds"] == "3"
    assert params["app_run_config"] == "num-server-rounds=2" and len(params["task.sha256"]) == 64
    assert {"summary.json", "metrics.jsonl", "messages.jsonl", "serverapp"} <= set(mlflow_server.artifacts(run_id))
    scalars = event_scalars(folder / "tensorboard")
    assert sorted(step for step, _ in scalars["accuracy"]) == [1, 2]
