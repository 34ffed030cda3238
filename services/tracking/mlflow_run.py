"""A run folder as an MLflow run, sent with MLflow's own client to the tracking server that
MLflow's ``MLFLOW_TRACKING_URI`` names.

``MlflowRun.sync`` is idempotent and resumable: it reads the run folder and sends only what
tracking.json says was not sent yet (the run itself, once, found again by its ``bouquet.run_id``
tag if its creation's answer was lost; the parameters; the rounds after the last one sent;
at the end the summary, the memory figures and the run folder's files as artifacts). Any
failure raises, and the next call goes on from where this one stopped.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from services.files import FLWR_RUN_LOG, MESSAGES, METRICS, SERVERAPP_FOLDER, files_under, read_rounds
from services.tracking.figures import initial_figures, round_figures
from services.tracking.progress import Progress

log = logging.getLogger("bouquet.tracking")

RUN_TAG = "bouquet.run_id"
BATCH = 900  # MLflow's log_batch takes at most 1000 metrics
# The run folder's files sent as artifacts at the end (those that exist; app mode's too: every
# message's record, Flower's log of the run, and what the ServerApp saved in serverapp/).
ARTIFACT_FILES = ("summary.json", METRICS, "state.json", "tracking.json", "memory.csv", "memory_summary.json", "report.html", MESSAGES, FLWR_RUN_LOG)
STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}  # any other end: FAILED
# MLflow 3's UI files an experiment without this tag under GenAI ("Evaluations"); Bouquet's runs
# train models, so its experiments open in the model-training view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# MLflow's client retries a failed request for minutes by default; here a failure should come
# back quickly: the sender retries on its own schedule and the run folder keeps everything.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def tracking_uri() -> str | None:
    """MLflow's own setting: unset or empty means no MLflow."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def epoch_ms(iso: str | None) -> int:
    if not iso:
        return int(time.time() * 1000)
    return int(dt.datetime.fromisoformat(iso).timestamp() * 1000)


def import_client() -> None:
    """MLflow's client library (about a second of CPU to import): the server imports it at start,
    before any round, so that the import never competes with a round."""
    import mlflow.entities  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401


class MlflowRun:
    """Sends one run folder to one MLflow experiment."""

    name = "mlflow"

    def __init__(self, folder: Path, experiment: str, uri: str | None = None) -> None:
        for key, value in CLIENT_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        self.folder = Path(folder)
        self.experiment = experiment
        self.uri = uri or tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.progress = Progress(self.folder, self.name)

    @property
    def where(self) -> str:
        return f"MLflow at {self.uri} (experiment {self.experiment!r})"

    def sync(self, final: bool = False) -> int:
        """Send what was not sent yet; with ``final``, also the end of the run. Returns the number
        of rounds sent by this call."""
        state = self.progress.get()
        run_id = state.get("run_id") or self._create_run()
        if state.get("ended") and not (self.folder / "summary.json").exists():  # resumed: running again
            from mlflow.entities import RunStatus

            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self.progress.update(ended=None)
        if not state.get("params_sent"):
            self._send_params(run_id)
        sent = self._send_rounds(run_id, state.get("rounds_sent", 0))
        if final and (self.folder / "summary.json").exists():
            if not self.finished():
                self._send_end(run_id)
            if (self.folder / "memory_summary.json").exists():
                self.send_monitor_records()
        return sent

    # -- the steps -----------------------------------------------------------------------------

    def _create_run(self) -> str:
        from mlflow.entities import RunStatus

        experiment_id = self._experiment_id()
        run_name = self.folder.name
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            run_id = self.client.create_run(experiment_id, run_name=run_name, tags={RUN_TAG: run_name, "bouquet.results": str(self.folder.resolve())}).info.run_id
        self.progress.update(run_id=run_id, experiment_id=experiment_id, uri=self.uri)
        log.info("run %s is MLflow run %s in experiment %r (%s)", run_name, run_id, self.experiment, self.uri)
        return run_id

    def _experiment_id(self) -> str:
        """The experiment, created if missing, with its kind: model training. An experiment made
        before (by an older Bouquet, or by hand) gets the kind if it has none; a kind someone
        chose is kept."""
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return self.client.create_experiment(self.experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id

    def _send_params(self, run_id: str) -> None:
        from mlflow.entities import Param

        params = Progress(self.folder, "run").get().get("params", {})
        if params:
            items = [Param(key, value[:6000]) for key, value in sorted(params.items())]
            for start in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[start : start + 100])
        self.progress.update(params_sent=True)

    def _send_rounds(self, run_id: str, rounds_sent: int) -> int:
        from mlflow.entities import Metric

        rounds = read_rounds(self.folder)
        initial = {} if self.progress.get().get("initial_sent") else initial_figures(self.folder)
        points = [Metric(key, value, epoch_ms(None), 0) for key, value in initial.items()]
        for record in rounds[rounds_sent:]:
            stamp = epoch_ms(record.get("ended_at"))
            points.extend(Metric(key, value, stamp, record["round"]) for key, value in round_figures(record).items())
        for start in range(0, len(points), BATCH):
            self.client.log_batch(run_id, metrics=points[start : start + BATCH])
        if initial:
            self.progress.update(initial_sent=True)
        if rounds[rounds_sent:] and not self.progress.get().get("num_partitions_sent"):
            partitions = rounds[-1].get("num_partitions")
            if partitions:
                from mlflow.entities import Param

                self.client.log_batch(run_id, params=[Param("num_partitions", str(partitions))])
                self.progress.update(num_partitions_sent=True)
        if len(rounds) != rounds_sent:
            self.progress.update(rounds_sent=len(rounds))
        return len(rounds) - rounds_sent

    def _send_end(self, run_id: str) -> None:
        """The summary's status, the run folder's files as artifacts, the run's MLflow status."""
        from mlflow.entities import RunTag

        summary = json.loads((self.folder / "summary.json").read_text())
        tags = [RunTag("bouquet.status", str(summary.get("status"))), RunTag("bouquet.rounds_completed", str(summary.get("rounds_completed")))]
        self.client.log_batch(run_id, tags=tags)
        self._send_files(run_id)
        self.client.set_terminated(run_id, status=STATUS.get(summary.get("status"), "FAILED"))
        self.progress.update(ended=summary.get("ended_at"))

    def send_monitor_records(self) -> None:
        """What the memory monitor writes after the server ended: its verdict, the memory held
        after each round, memory.csv and report.html (called by the monitor when it is done)."""
        from mlflow.entities import Metric, RunTag

        run_id = self.progress.get()["run_id"]
        memory = self._memory_summary()
        if memory and not self.progress.get().get("memory_sent"):
            verdict = memory.get("verdict") or {}
            points = [Metric("memory_verdict_ok", float(verdict["ok"]), epoch_ms(None), 0)] if verdict.get("ok") is not None else []
            by_round = {r["round"]: r for r in read_rounds(self.folder)}
            for entry in memory.get("rounds", []):
                stamp = epoch_ms(by_round.get(entry.get("round"), {}).get("ended_at"))
                points.extend(Metric(k, v, stamp, entry["round"]) for k, v in round_figures({}, entry).items())
            for start in range(0, len(points), BATCH):
                self.client.log_batch(run_id, metrics=points[start : start + BATCH])
            self.client.log_batch(run_id, tags=[RunTag("bouquet.memory_verdict", str(verdict.get("text")))])
            self.progress.update(memory_sent=True)
        self._send_files(run_id)

    def _send_files(self, run_id: str) -> None:
        """The run folder's files that were not sent yet, or changed since (by size and time)."""
        sent = self.progress.get().get("artifacts", {})
        checkpoints = sorted((self.folder / "checkpoints").glob("round-*.npz"))
        files = [(self.folder / name, None) for name in ARTIFACT_FILES] + [(checkpoint, "checkpoints") for checkpoint in checkpoints[-1:]]
        files += [(path, str(path.parent.relative_to(self.folder))) for path in files_under(self.folder / SERVERAPP_FOLDER)]
        for path, under in files:
            if not path.exists():
                continue
            stat = path.stat()
            key, version = str(path.relative_to(self.folder)), [stat.st_size, stat.st_mtime_ns]
            if sent.get(key) != version:
                self.client.log_artifact(run_id, str(path), artifact_path=under)
                sent[key] = version
                self.progress.update(artifacts=sent)
        if (self.folder / "tensorboard").is_dir():
            self.client.log_artifacts(run_id, str(self.folder / "tensorboard"), artifact_path="tensorboard")

    def _memory_summary(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.folder / "memory_summary.json").read_text())
        except (OSError, ValueError):
            return None

    def finished(self) -> bool:
        """Whether this run's end (summary.json as it is now) was sent."""
        try:
            ended = json.loads((self.folder / "summary.json").read_text()).get("ended_at")
        except (OSError, ValueError):
            return False
        return self.progress.get().get("ended") == ended


def send_later(folder: Path, experiment: str | None = None, uri: str | None = None) -> MlflowRun | None:
    """The run folder's MLflow run, for sending after the server: the tracking server and
    experiment it was recorded with (tracking.json), else MLFLOW_TRACKING_URI and the given
    experiment. None when neither names a tracking server."""
    recorded = Progress(folder, MlflowRun.name).get()
    uri = uri or recorded.get("uri") or tracking_uri()
    if not uri:
        return None
    params = Progress(folder, "run").get().get("params", {})
    return MlflowRun(folder, experiment or params.get("mlflow_experiment") or "bouquet", uri)
