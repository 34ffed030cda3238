"""scripts/bench.py: the CI smoke run (--quick) and its inputs. No timing is asserted: the
numbers depend on the machine; only that every configuration ran and was reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import plan

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"
LABELS = ["(a) in-process", "(b) spawn worker", "(c) forkserver worker", "(d) Deployment Engine"]


@pytest.mark.integration
def test_quick_runs_all_four_configurations_and_writes_table_json_and_plot(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(out), "--data-dir", str(data_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    table = (out / "bench.md").read_text()
    for label in LABELS:
        assert label in table
    assert "Server side as the federation grows" in table
    assert table in done.stdout

    payload = json.loads((out / "bench.json").read_text())
    assert {cell["config"] for cell in payload["cells"]} == set(plan.CONFIGS)
    for cell in payload["cells"]:
        summary = cell["summary"]
        assert "error" not in summary, summary
        assert summary["rounds"] == 2 and summary["clients_failed"] == 0
        assert isinstance(summary["round_seconds"], float)
        assert summary["peak_rss_mib"] is not None
        if cell["config"] == "inprocess":
            assert summary["worker_start_seconds"] is None
        else:
            assert isinstance(summary["worker_start_seconds"], float)
    assert "worker_start_forkserver_vs_spawn" in payload["headline"]
    assert payload["meta"]["plan"]["order"] == [run.name for run in plan.interleaved(list(plan.CONFIGS), ["digits"], [2], 1)]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The table can be re-drawn from the JSON alone.
    (out / "bench.md").unlink()
    again = subprocess.run([sys.executable, str(BENCH), "--render", str(out / "bench.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert (out / "bench.md").read_text() == table


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--clients", "0"], "--clients"),
        (["--clients", "2,x"], "--clients"),
        (["--configs", "spawn,fork"], "--configs"),
        (["--datasets", "cifar10"], "--datasets"),
        (["--rounds", "-1"], "--rounds"),
        (["--model", "digits-cnn"], "--model"),
    ],
)
def test_bad_flags_exit_2_with_one_line_naming_the_flag(flags: list[str], named: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH), *flags], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr


def test_runs_are_interleaved_and_the_order_rotates_between_cells() -> None:
    runs = plan.interleaved(["inprocess", "spawn", "forkserver", "deployment"], ["synthetic", "digits"], [2, 5], 2)
    assert len(runs) == 2 * 2 * 2 * 4
    cells = [runs[i : i + 4] for i in range(0, len(runs), 4)]
    for cell in cells:  # every configuration once per cell, all on the same data set and N
        assert sorted(run.config for run in cell) == sorted(["inprocess", "spawn", "forkserver", "deployment"])
        assert len({(run.dataset, run.clients, run.repeat) for run in cell}) == 1
    assert len({cell[0].config for cell in cells}) == 4  # no configuration always goes first
