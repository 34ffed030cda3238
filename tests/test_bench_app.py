"""scripts/bench_app.py (issue 18 item 6): the timed copy of the example App, how each
configuration's records become rounds, and the CI smoke run (--quick). No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from benchmarks import appmode, bouquet

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench_app.py"


def test_the_timed_copy_wraps_the_apps_own_components_and_keeps_its_config(tmp_path: Path) -> None:
    app = appmode.timed_app(tmp_path / "app")
    flwr = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "bench_timed_app.server_app:app", "clientapp": "bench_timed_app.client_app:app"}
    assert {key: flwr["config"][key] for key in appmode.app_config()} == appmode.app_config()
    assert set(appmode.run_config(2, tmp_path / "t.jsonl", 1.0)) <= set(flwr["config"])  # the SuperLink refuses undeclared keys
    for module in ("task.py", "client_app.py", "server_app.py"):  # the app's own code, byte for byte
        assert (app / "quickstart_app" / module).read_bytes() == (appmode.EXAMPLE / "quickstart_app" / module).read_bytes()


def test_task_mode_trains_the_apps_task_with_the_apps_settings() -> None:
    spec = appmode.task_spec(appmode.app_config())
    assert Path(spec.task) == appmode.EXAMPLE / "quickstart_app" / "task.py"
    assert (spec.local_epochs, spec.batch_size, spec.learning_rate) == (1, 32, 0.05)


TIMINGS = [
    {"event": "round_end", "round": 0, "at": 100.0, "accuracy": 0.1, "pid": 9},
    {"event": "handler", "server_round": 1, "partition": 0, "message_type": "train", "pid": 11, "entered_at": 103.0, "process_age_seconds": 2.5, "handler_seconds": 0.4},
    {"event": "handler", "server_round": 1, "partition": 1, "message_type": "train", "pid": 12, "entered_at": 104.0, "process_age_seconds": 3.5, "handler_seconds": 0.4},
    {"event": "round_end", "round": 1, "at": 106.0, "accuracy": 0.5, "pid": 9},
    {"event": "handler", "server_round": 2, "partition": 0, "message_type": "train", "pid": 13, "entered_at": 108.0, "process_age_seconds": 0.1, "handler_seconds": 0.4},
    {"event": "round_end", "round": 2, "at": 110.5, "accuracy": 0.8, "pid": 9},
    {"event": "rounds_done", "at": 110.6, "pid": 9},
]


def test_probe_rounds_time_rounds_between_central_evaluations_and_messages_from_process_start() -> None:
    rounds = appmode.probe_rounds(TIMINGS)
    assert [(r["round"], r["round_seconds"], r["accuracy"]) for r in rounds] == [(1, 6.0, 0.5), (2, 4.5, 0.8)]
    assert [c["worker_start_seconds"] for c in rounds[0]["clients"]] == [2.5, 3.5]
    assert appmode.spread(appmode.message_starts(rounds)) == {"median": 2.5, "min": 0.1, "max": 3.5, "count": 3}


def test_app_mode_messages_start_at_the_nodes_launch_request() -> None:
    launches = [{"pid": 11, "asked_at": 102.75, "worker_start_seconds": 0.05, "slot_wait_seconds": 0.0, "outcome": "ok"},
                {"pid": 12, "asked_at": 103.5, "outcome": "ok"}, {"pid": 13, "asked_at": 107.9, "outcome": "ok"}]
    rounds = appmode.probe_rounds(TIMINGS, launches)
    first = rounds[0]["clients"][0]
    assert (first["worker_start_seconds"], first["process_start_to_handler_seconds"], first["bouquet_worker_start_seconds"]) == (0.25, 2.5, 0.05)
    with pytest.raises(RuntimeError, match="process 13"):
        appmode.probe_rounds(TIMINGS, launches[:2])


@pytest.mark.integration
def test_quick_runs_every_configuration_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "app-bench"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "app-bench.md").read_text()
    assert table in done.stdout
    payload = json.loads((out / "app-bench.json").read_text())
    assert [r["config"] for r in payload["results"]] == list(appmode.CONFIGS)
    for result in payload["results"]:
        assert appmode.LABELS[result["config"]] in table
        summary = result["summary"]
        assert "error" not in summary, summary
        assert summary["rounds"] == 2 and summary["messages"] == 2 * 2  # every client trained every round
        assert isinstance(summary["round_seconds"], float) and summary["peak_pss_mib"] is not None
    for config in ("app", "app-preload"):
        records = [json.loads(line) for line in (out / "runs" / config / bouquet.RUN_ID / "messages.jsonl").read_text().splitlines()]
        # A message forked from the pool's warm child for the run imports nothing again; a node's
        # first (cold) message imports scikit-learn unless the warm process preloaded it.
        assert records and all(("sklearn" in r["imported_after_fork"]) is (config == "app" and not r["app_was_warm"]) for r in records), config
        assert any(r["app_was_warm"] for r in records), config
