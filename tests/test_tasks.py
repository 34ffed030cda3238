"""Your own task and your own strategy (issue 11): a Flower quickstart-shaped task.py on local
parquet files runs end to end over gRPC; every strategy trains; every bad FL_TASK / FL_STRATEGY /
FL_STRATEGY_ARGS stops the server with exit 2 naming it before anything starts; a task whose
train raises fails that round for that client only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from flwr.common import Code

from conftest import PYTHON, REPO
from services import task as task_module
from services.client.flower import WorkerClient
from services.taskspec import Placement
from test_client import digits_spec, fit_ins

pytestmark = pytest.mark.integration  # every test here starts servers, workers or a federation

EXAMPLE = REPO / "examples" / "quickstart-digits"

GOOD = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
    def forward(self, x):
        return self.fc(x)

def load_data(partition_id, num_partitions, batch_size):
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    return DataLoader(data, batch_size=batch_size), DataLoader(data, batch_size=batch_size)

def train(net, trainloader, epochs, lr, device):
    return 0.5

def test(net, testloader, device):
    return 0.5, 0.5
'''


def write_task(folder: Path, source: str, name: str = "task.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def server(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "services.server", "--worker-start", "spawn", "--listen-address", "127.0.0.1:1",
         "--results-dir", str(tmp_path / "results"), "--data-dir", str(tmp_path / "data"), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


BAD_TASKS = {
    "missing file": (None, "no such file"),
    "fails to import": (GOOD + "\nraise RuntimeError('broken at import')\n", "fails to import: RuntimeError: broken at import (" ),
    "no train": (GOOD.replace("def train(", "def fit("), "defines no function train(net, trainloader, epochs, lr, device)"),
    "load_data with the partition alone": (
        GOOD.replace("def load_data(partition_id, num_partitions, batch_size):", "def load_data(partition_id):\n    batch_size = 4"),
        "load_data(partition_id) cannot be called as load_data(partition_id, num_partitions, batch_size) or as load_data(partition_id, num_partitions)",
    ),
    "no Net": (GOOD.replace("class Net(", "class Model("), "defines no Net"),
    "every mismatch at once": (
        GOOD.replace("class Net(", "class Model(").replace("def train(", "def fit(").replace("def test(net, testloader, device)", "def test(net, testloader)"),
        "3 problems: (1) defines no function train(net, trainloader, epochs, lr, device); "
        "(2) test(net, testloader) cannot be called as test(net, testloader, device): too many positional arguments; "
        "(3) defines no Net",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TASKS))
def test_a_bad_task_exits_2_naming_fl_task_before_anything_starts(tmp_path, case):
    source, expected = BAD_TASKS[case]
    path = tmp_path / "absent.py" if source is None else write_task(tmp_path, source)
    done = server(tmp_path, "--task", str(path))
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = [line for line in done.stderr.splitlines() if "error:" in line]
    assert f"--task / FL_TASK = '{path}'" in line and expected in line, line
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir()), "a run folder was created"


def test_a_module_name_that_does_not_import_is_named(tmp_path):
    done = server(tmp_path, "--task", "no_such_package.task")
    assert done.returncode == 2 and "FL_TASK = 'no_such_package.task': no module named 'no_such_package'" in done.stderr


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--strategy", "fedsgd"], "--strategy / FL_STRATEGY = 'fedsgd' (from --strategy): must be one of: fedavg,"),
        (["--strategy", "fedprox"], "--strategy / FL_STRATEGY = 'fedprox' needs proximal_mu=... in --strategy-args / FL_STRATEGY_ARGS"),
        (["--strategy", "fedavgm", "--strategy-args", "server_momentum=0.9,momentum=1"], "FedAvgM (fedavgm) has no argument 'momentum'; it takes: server_learning_rate, server_momentum"),
        (["--strategy", "fedtrimmedavg", "--strategy-args", "beta=lots"], "beta='lots' must be a number"),
        (["--strategy", "krum", "--strategy-args", "num_clients_to_keep"], "must be key=value pairs separated by commas"),
        (["--strategy", "fedavg", "--strategy-args", "fraction_fit=0.5"], "FedAvg (fedavg) has no argument 'fraction_fit'"),
    ],
)
def test_a_bad_strategy_setting_exits_2_naming_it(tmp_path, flags, expected):
    done = server(tmp_path, *flags)
    assert done.returncode == 2 and expected in done.stderr, done.stderr[-2000:]


def test_fedprox_with_a_train_that_cannot_take_the_proximal_term_is_refused(tmp_path):
    path = write_task(tmp_path, GOOD)
    done = server(tmp_path, "--task", str(path), "--strategy", "fedprox", "--strategy-args", "proximal_mu=0.1")
    assert done.returncode == 2
    assert "--strategy / FL_STRATEGY = 'fedprox': the task's train()" in done.stderr and "takes no proximal_mu" in done.stderr


def test_a_load_data_without_batch_size_is_called_with_the_partition_alone(tmp_path, data_dir):
    """Flower's advanced-pytorch and fl-tabular shape: load_data(partition_id, num_partitions)."""
    path = write_task(tmp_path, GOOD.replace(
        "def load_data(partition_id, num_partitions, batch_size):\n",
        "def load_data(partition_id, num_partitions):\n    assert (partition_id, num_partitions) == (0, 3)\n    batch_size = 4\n",
    ))
    assert task_module.check_task(str(path))["task"] == str(path)  # the server's check accepts it
    client = WorkerClient("c", Placement(str(data_dir), "cpu"), "spawn")
    trained = client.fit(fit_ins(digits_spec(task=str(path))))
    assert trained.status.code == Code.OK, trained.status.message
    assert trained.num_examples == 8


def test_a_task_whose_train_raises_fails_that_round_only(tmp_path, data_dir):
    marker = tmp_path / "raise-once"
    marker.touch()
    path = write_task(tmp_path, GOOD.replace(
        "def train(net, trainloader, epochs, lr, device):\n",
        f"def train(net, trainloader, epochs, lr, device):\n    import os\n    if os.path.exists({str(marker)!r}):\n        os.remove({str(marker)!r})\n        return 1 / 0\n",
    ))
    line = path.read_text().splitlines().index("        return 1 / 0") + 1
    client = WorkerClient("c", Placement(str(data_dir), "cpu"), "spawn")
    spec = digits_spec(task=str(path))
    failed = client.fit(fit_ins(spec))
    assert failed.status.code != Code.OK
    failure = json.loads(failed.status.message)
    assert failure["kind"] == "task error"
    assert failure["cause"] == f"TaskError: train raised ZeroDivisionError: division by zero ({path}:{line} in train)", failure
    assert "1 / 0" in failure["traceback"]  # the task's own line, in the traceback the server records
    again = client.fit(fit_ins(spec))
    assert again.status.code == Code.OK and again.num_examples == 8  # len(trainloader.dataset)


def run_local(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[dict, list[dict]]:
    done = subprocess.run(
        [PYTHON, "scripts/run_local.py", "--results-dir", str(tmp_path / "results"), "--run-id", "run",
         "--data-dir", str(tmp_path / "data"), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "results" / "run"
    return json.loads((run / "summary.json").read_text()), [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def user_task(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The example's task.py, copied where a user would keep it, its parquet data built offline."""
    folder = tmp_path_factory.mktemp("my-task")
    shutil.copy(EXAMPLE / "task.py", folder / "task.py")
    data = folder / "data"
    subprocess.run([PYTHON, str(EXAMPLE / "prepare_data.py"), "--out", str(data)], check=True, capture_output=True)
    return folder / "task.py", {"DIGITS_PARQUET_DIR": str(data), "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(folder / "hf")}


def test_a_quickstart_shaped_task_trains_end_to_end_in_fresh_workers(tmp_path, user_task):
    path, env = user_task
    summary, rounds = run_local(tmp_path, "--clients", "3", "--rounds", "3", "--task", str(path), env=env)
    assert summary["status"] == "completed" and summary["task"]["path"] == str(path)
    assert summary["task"]["sha256"] and summary["central_evaluation"] is True
    accuracies = [summary["initial_accuracy"], *(r["accuracy"] for r in rounds)]
    assert accuracies == sorted(accuracies) and accuracies[-1] > 0.8, accuracies
    # len(trainloader.dataset): 3 IID partitions of 479 examples, of which train_test_split keeps 383 each
    assert [c["num_examples"] for c in rounds[0]["clients"]] == [383, 383, 383]
    pids = [{c["id"]: c["worker_pid"] for c in r["clients"]} for r in rounds]
    for client in pids[0]:
        assert len({p[client] for p in pids}) == len(rounds), "a worker was reused"


def test_a_task_without_held_out_data_is_evaluated_by_the_clients(tmp_path, user_task):
    path, env = user_task
    plain = write_task(tmp_path, path.read_text().replace("def load_centralized_dataset", "def _unused").replace(
        'return loss / len(testloader), {"accuracy": accuracy}', "return loss / len(testloader), accuracy"))
    summary, rounds = run_local(tmp_path, "--clients", "2", "--rounds", "2", "--task", str(plain), env=env)
    assert summary["central_evaluation"] is False and summary["client_eval"] is True
    assert summary["initial_accuracy"] is None
    for record in rounds:
        assert record["accuracy_source"] == "clients" and record["client_eval"]["clients"] == 2
        assert 0 < record["accuracy"] <= 1


STRATEGY_ARGS = {"fedprox": "proximal_mu=0.1", "fedtrimmedavg": "beta=0.1"}


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum"])
def test_every_strategy_trains_two_rounds_on_digits(tmp_path, strategy):
    extra = ["--strategy-args", STRATEGY_ARGS[strategy]] if strategy in STRATEGY_ARGS else []
    summary, rounds = run_local(tmp_path, "--clients", "2", "--rounds", "2", "--strategy", strategy, *extra)
    assert summary["status"] == "completed" and summary["strategy"]["name"] == strategy
    assert all(r["trained"] and r["accuracy"] is not None for r in rounds)
    if strategy == "fedprox":  # the proximal term reached the built-in train()
        assert summary["strategy"]["args"] == {"proximal_mu": 0.1}
        assert {c["proximal_mu"] for r in rounds for c in r["clients"]} == {0.1}
