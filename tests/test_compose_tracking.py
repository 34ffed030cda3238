"""The compose profiles `tracking` and `metrics` as docs/tracking.md says to use them: one
`--profile tracking --profile metrics up --scale client=3` with nothing else to type, then the
run read back where a user looks: MLflow's REST API on the published 127.0.0.1 port (the run,
its accuracy per round as metrics.jsonl has it, its artifacts including the monitor's
report.html) and Prometheus's HTTP API (the server's round figures and the monitor's gauges).
Needs bouquet/tracking:bookworm and bouquet/prometheus:bookworm (scripts/build_tracker_images.sh;
CI builds them).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from test_compose import Stack, _docker_ready, _unavailable
from trackers import free_port

TRACKER_IMAGES = ("bouquet/tracking:bookworm", "bouquet/prometheus:bookworm")
REPLICAS = 3
ROUNDS = 3


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def eventually(read, timeout: float, what: str, logs):
    """``read()``'s first truthy answer; connection errors count as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = read()
        except OSError:
            answer = None
        if answer:
            return answer
        assert time.monotonic() < deadline, f"{what}: nothing within {timeout:g} s\n{logs()}"
        time.sleep(2)


@pytest.mark.docker
@pytest.mark.timeout(1500)
def test_tracking_and_metrics_profiles_record_the_run_with_nothing_else_to_type(tmp_path: Path) -> None:
    compose = _docker_ready("v2")
    missing = [image for image in TRACKER_IMAGES if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode]
    if missing:
        _unavailable(f"images {missing} are missing: run scripts/build_tracker_images.sh")
    results = tmp_path / "results"
    results.mkdir()
    mlflow_port, prometheus_port = free_port(), free_port()
    # Rounds of several seconds (40 local epochs, one worker slot for the 3 replicas): Prometheus
    # scrapes every 2 s, and digits' default rounds (~0.5 s) can all pass between two scrapes.
    stack = Stack(compose, results, "tracking", FL_DATASET="digits", FL_ROUNDS=str(ROUNDS), FL_LOCAL_EPOCHS="40", FL_RUN_ID="tracked", FL_WORKER_SLOTS="1",
                  BOUQUET_MLFLOW_PORT=str(mlflow_port), BOUQUET_PROMETHEUS_PORT=str(prometheus_port))
    logs = stack.logs
    mlflow = f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow"
    prometheus = f"http://127.0.0.1:{prometheus_port}/api/v1"
    try:
        stack.run("--profile", "tracking", "--profile", "metrics", "up", "--detach", "--no-build", "--scale", f"client={REPLICAS}", timeout=600)
        run_dir = results / "tracked"
        eventually(lambda: (run_dir / "summary.json").exists(), 900, "the run's summary.json", logs)
        rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed" and len(rounds) == ROUNDS, logs()

        def finished_run() -> dict | None:
            experiment = get(f"{mlflow}/experiments/get-by-name?experiment_name=bouquet")["experiment"]["experiment_id"]
            runs = json.loads(urllib.request.urlopen(urllib.request.Request(
                f"{mlflow}/runs/search", data=json.dumps({"experiment_ids": [experiment], "filter": "tags.`bouquet.run_id` = 'tracked'"}).encode(),
                headers={"Content-Type": "application/json"}), timeout=10).read()).get("runs", [])
            return runs[0] if runs and runs[0]["info"]["status"] == "FINISHED" else None

        run = eventually(finished_run, 300, "a FINISHED MLflow run for 'tracked'", logs)
        run_id = run["info"]["run_id"]
        history = get(f"{mlflow}/metrics/get-history?run_id={run_id}&metric_key=accuracy")["metrics"]
        assert {m["step"]: m["value"] for m in history if m["step"] > 0} == pytest.approx({r["round"]: r["accuracy"] for r in rounds})
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["num_partitions"] == str(REPLICAS) and params["engine_mode"].startswith("task")

        def artifacts() -> set[str] | None:  # report.html comes from the memory monitor, after the server ended
            names = {f["path"] for f in get(f"{mlflow}/artifacts/list?run_id={run_id}").get("files", [])}
            return names if "report.html" in names else None

        assert {"summary.json", "metrics.jsonl", "memory.csv", "report.html"} <= eventually(artifacts, 300, "report.html as an MLflow artifact", logs)

        def samples(series: str) -> dict[float, float]:
            """Every sample Prometheus scraped of ``series`` in the last 30 min, by scrape time
            (the server has exited: its series are stale, but a range selector returns its samples)."""
            found = get(f"{prometheus}/query?query={urllib.parse.quote(series + '[30m]')}")["data"]["result"]
            return {float(t): float(v) for result in found for t, v in result["values"]}

        scraped_rounds = eventually(lambda: {t: r for t, r in samples("bouquet_server_round").items() if r >= 1}, 120, "a round in Prometheus", logs)
        accuracy = samples("bouquet_server_accuracy")
        by_round = {r["round"]: r["accuracy"] for r in rounds}
        assert max(scraped_rounds.values()) <= ROUNDS
        for at, number in scraped_rounds.items():  # one scrape: the round and its accuracy together
            assert accuracy[at] == pytest.approx(by_round[int(number)]), (at, number)
        assert samples("bouquet_device_memory_used_mib"), "the memory monitor's gauges were not scraped"
        rules = get(f"{prometheus}/rules")["data"]["groups"]
        assert "BouquetMemoryHeldAfterRound" in {rule["name"] for group in rules for rule in group["rules"]}
    finally:
        stack.run("--profile", "tracking", "--profile", "metrics", "down", "--volumes", "--remove-orphans", "--timeout", "10", check=False, timeout=180)
