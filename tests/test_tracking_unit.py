"""The trackers' parts without a tracking server: the figures of a round, the run's parameters,
the background sender's behaviour when its tracker fails, tracking.json's sections, the MLflow
experiment's kind (in a local MLflow store)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO
from services.tracking.figures import initial_figures, round_figures, run_params
from services.tracking.progress import TRACKING, Progress
from services.tracking.sender import Sender

RECORD = {
    "round": 3,
    "trained": True,
    "accuracy": 0.91,
    "loss": 0.3,
    "round_seconds": 4.5,
    "aggregate_seconds": 0.01,
    "clients_ok": 2,
    "clients_failed": 1,
    "missing": [{"partition": 3, "id": None, "reason": "not connected"}],
    "metrics": {"accuracy": 0.91, "f1": 0.88, "note": "text is not a figure"},
    "concurrent_workers_peak": {"cpu": 2, "cuda:0": 3},
    "clients": [{"slot_wait_seconds": 0.5}, {"slot_wait_seconds": 1.5}, {"id": "no wait recorded"}],
    "client_eval": {"loss": None, "accuracy": 0.8, "clients": 2, "failed": 0},
}


def test_round_figures_are_the_records_numbers_under_one_set_of_names():
    figures = round_figures(RECORD, {"round": 3, "residual_mib": 12.5, "peak_mib": 900.0})
    assert figures == {
        "accuracy": 0.91, "loss": 0.3, "round_seconds": 4.5, "aggregate_seconds": 0.01,
        "clients_ok": 2.0, "clients_failed": 1.0, "clients_missing": 1.0, "trained": 1.0,
        "task.f1": 0.88, "workers_peak": 3.0, "workers_peak.cpu": 2.0, "workers_peak.cuda:0": 3.0,
        "slot_wait_seconds_max": 1.5, "slot_wait_seconds_mean": 1.0, "client_eval.accuracy": 0.8,
        "memory_residual_mib": 12.5, "memory_peak_mib": 900.0,
    }


def test_a_round_without_evaluation_sends_no_accuracy_and_rejected_updates_count():
    figures = round_figures({"round": 1, "trained": False, "accuracy": None, "loss": float("nan"), "rejected": [{"id": "a"}, {"id": "b"}]})
    assert "accuracy" not in figures and "loss" not in figures
    assert figures["clients_rejected"] == 2.0 and figures["trained"] == 0.0


def test_run_params_carry_settings_task_hash_engine_and_versions():
    params = run_params({"strategy": "fedprox", "strategy_args": {"proximal_mu": 0.1}, "rounds": 5}, {"path": "/t.py", "sha256": "abc"}, "task")
    assert params["strategy"] == "fedprox" and json.loads(params["strategy_args"]) == {"proximal_mu": 0.1}
    assert params["rounds"] == "5" and params["task.path"] == "/t.py" and params["task.sha256"] == "abc" and params["engine_mode"] == "task"
    assert params["version.flwr"] == "1.42.0" and params["version.torch"] == "2.15.0"  # requirements.lock's pins


def test_the_trackers_keep_torch_out_of_the_server_and_mlflow_out_until_it_is_on(tmp_path):
    """The server imports services.tracking.run at start: no torch, no MLflow. Then TensorBoard's
    writer (tensorboardX imports torch when it can) writes a round, and MLflow's client is
    imported as the sender does: still no torch in the process."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.5, "trained": True}) + "\n")
    code = (
        "import sys; from services.tracking.run import RunTracking; from services.tracking.figures import run_params\n"
        "print(sorted(m for m in ('torch', 'mlflow', 'tensorboardX') if m in sys.modules))\n"
        "from services.tracking.tensorboard import TensorBoardLog, import_writer\n"
        f"import_writer(); log = TensorBoardLog({str(tmp_path)!r}); log.sync(final=True)\n"
        "from mlflow.tracking import MlflowClient\n"
        "print('torch' in sys.modules, log.finished())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "False True"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_initial_figures_come_from_state_json(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"initial": {"accuracy": 0.1, "loss": 2.3, "metrics": {}}}))
    assert initial_figures(tmp_path) == {"accuracy": 0.1, "loss": 2.3}
    assert initial_figures(tmp_path / "missing") == {}


def test_progress_sections_are_kept_apart_in_one_file(tmp_path):
    Progress(tmp_path, "mlflow").update(run_id="r1", rounds_sent=2)
    Progress(tmp_path, "tensorboard").update(rounds_written=3)
    Progress(tmp_path, "mlflow").update(rounds_sent=4)
    assert json.loads((tmp_path / TRACKING).read_text()) == {"mlflow": {"run_id": "r1", "rounds_sent": 4}, "tensorboard": {"rounds_written": 3}}


class FlakyTracker:
    """Fails while ``down`` is set; records every call."""

    name = "flaky"
    where = "the flaky tracker"

    def __init__(self) -> None:
        self.down = threading.Event()
        self.calls: list[bool] = []
        self.sent_after_failure = threading.Event()
        self.ended = False

    def sync(self, final: bool = False) -> int:
        self.calls.append(final)
        if self.down.is_set():
            raise ConnectionError("connection refused")
        if len(self.calls) > 1 and not self.down.is_set():
            self.sent_after_failure.set()
        if final:
            self.ended = True
        return 1

    def finished(self) -> bool:
        return self.ended


def test_a_failing_tracker_is_logged_once_retried_and_its_end_sent_when_back(caplog):
    tracker = FlakyTracker()
    tracker.down.set()
    caplog.set_level(logging.INFO, logger="bouquet.tracking")
    sender = Sender("flaky", lambda: tracker, "resend by hand").start()
    for _ in range(3):
        sender.poke()
    tracker.down.clear()
    sender.poke()
    assert tracker.sent_after_failure.wait(10)
    assert sender.finish(10) is True
    assert tracker.calls[-1] is True and tracker.ended
    warnings = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(warnings) == 1
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_a_tracker_still_down_at_the_end_is_given_up_on_with_the_way_to_resend(caplog):
    tracker = FlakyTracker()
    tracker.down.set()
    sender = Sender("flaky", lambda: tracker, "python -m services.tracking RUN").start()
    assert sender.finish(0.5) is False
    assert any("python -m services.tracking RUN" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


def test_a_tracker_whose_client_cannot_even_be_built_never_raises_into_the_server(caplog):
    def broken():
        raise ImportError("no module named mlflow")

    sender = Sender("mlflow", broken, "hint").start()
    sender.poke()
    assert sender.finish(0.5) is False
    assert "ImportError" in (sender.last_error or "")


def test_the_memory_alert_fires_for_memory_held_after_a_round_and_not_during_one():
    """tests/prometheus-rules-test.yml, run by Prometheus's own rule tester against the rules
    compose's `metrics` profile loads."""
    from trackers import program

    promtool = program("promtool", "BOUQUET_PROMTOOL", [Path("/usr/bin/promtool")])
    done = subprocess.run([promtool, "test", "rules", "prometheus-rules-test.yml"], cwd=REPO / "tests", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    checked = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=REPO / "deploy" / "prometheus", capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_grafana_dashboard_shows_only_series_bouquet_exports():
    """The dashboard's queries name the server's and the monitor's metrics (Grafana itself is not
    installable here: its queries are run against a real Prometheus in test_tracking.py)."""
    import re

    from services.monitor.exporter import Exporter
    from services.tracking.prometheus import GAUGES

    dashboard = json.loads((REPO / "deploy" / "grafana" / "bouquet-dashboard.json").read_text())
    names = {name for panel in dashboard["panels"] for target in panel["targets"] for name in re.findall(r"bouquet_[a-z_]+", target["expr"])}
    exported = set(GAUGES) | {"bouquet_server_round_clients"} | set(re.findall(r'"(bouquet_[a-z_]+)"', Path(__import__("inspect").getsourcefile(Exporter)).read_text()))
    assert names and names <= exported, names - exported


def test_an_optional_mlflow_whose_host_does_not_resolve_is_off_and_one_that_resolves_is_on():
    from services.tracking.run import resolvable

    assert resolvable("http://127.0.0.1:5000") and resolvable("http://localhost:5000")
    assert resolvable("sqlite:///mlflow.db")  # nothing to resolve
    assert not resolvable("http://no-such-host.invalid:5000", attempts=1)


def test_bouquets_mlflow_experiment_opens_as_model_training_not_genai(tmp_path):
    """MLflow 3's UI files an experiment without ``mlflow.experimentKind`` under GenAI evaluations.
    Against a real MLflow store (sqlite): the experiment Bouquet creates, and one that existed
    without the tag, are model training; a kind that someone set is kept."""
    from mlflow.tracking import MlflowClient

    from services.tracking.mlflow_run import MlflowRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("made-before")
    client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    for experiment in ("new", "made-before", "chosen"):
        folder = tmp_path / experiment / "run-1"
        folder.mkdir(parents=True)
        MlflowRun(folder, experiment, uri).sync()
        assert client.search_runs([client.get_experiment_by_name(experiment).experiment_id])  # the run is there
    kinds = {name: client.get_experiment_by_name(name).tags.get("mlflow.experimentKind") for name in ("new", "made-before", "chosen")}
    assert kinds == {"new": "custom_model_development", "made-before": "custom_model_development", "chosen": "genai_development"}
