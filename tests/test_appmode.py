"""App mode on real processes over loopback: ``scripts/run_local.py --app`` with a Flower App.

The example App (examples/quickstart-app) on 3 SuperNodes for 2 rounds: it completes, every
ClientApp message ran in a fresh worker forked from its node's warm forkserver, never more
workers at once than slots, partitions 0..2. And the failures Flower itself leaves silent or
hanging: a ServerApp that does not import, a ClientApp whose every reply is an error, a node
that cannot get a slot in time (the message fails through Flower, no relaunch loop), a warm
process killed between messages (the next message gets a new one), a node whose replies are
poison (refused reply by reply, the run completes with a finite model). The failing Apps are the
example with one module replaced, written into the test's folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import PYTHON, REPO
from services.net import free_port

pytestmark = pytest.mark.integration

EXAMPLE = REPO / "examples" / "quickstart-app"
CLIENTS = 3


def run_app(app: Path, work: Path, clients: int, rounds: int, *extra: str, timeout: float = 560) -> tuple[subprocess.CompletedProcess, Path]:
    run_id = "app-run"
    done = subprocess.run(
        [PYTHON, "scripts/run_local.py", "--app", str(app), "--clients", str(clients), "--app-run-config", f"num-server-rounds={rounds}",
         "--results-dir", str(work / "results"), "--data-dir", str(work / "data"), "--run-id", run_id, *extra],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    return done, work / "results" / run_id


def app_with(tmp_path: Path, module: str, source: str) -> Path:
    """The example App with one of its modules replaced."""
    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("__pycache__"))
    (app / "quickstart_app" / module).write_text(source)
    return app


def messages(run_path: Path) -> list[dict]:
    return [json.loads(line) for line in (run_path / "messages.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    done, run_path = run_app(EXAMPLE, tmp_path_factory.mktemp("example"), CLIENTS, 2, "--monitor")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return run_path, json.loads((run_path / "summary.json").read_text()), messages(run_path), done


def test_the_example_app_completes(example_run):
    run_path, summary, records, done = example_run
    assert summary["status"] == "completed" and summary["cause"] is None
    assert summary["flwr_status"] == "finished:completed"
    assert summary["foreign_supernodes"] == 0 and summary["rounds_completed"] == 2 and summary["ended_at"]
    assert (run_path / "flwr-run.log").read_text().count("[ROUND") == 2
    assert "final central accuracy" in (run_path / "flwr-run.log").read_text()
    assert sorted(p.name for p in (run_path / "logs").iterdir()) == ["client-0.log", "client-1.log", "client-2.log", "monitor.log", "server.log", "submit.log", "worker-pool.log"]


def test_each_node_loads_the_app_once_and_names_what_to_preload_and_later_messages_start_with_it_loaded(example_run):
    run_path, _, records, _ = example_run
    for node in {r["node"] for r in records}:
        first, *later = [r for r in records if r["node"] == node]
        # The first message loads the App (and says what the warm process could import once) ...
        assert not first["app_was_warm"] and first["app_load_seconds"] > 0 and "sklearn" in first["app_imports_after_fork"]
        # ... the next ones are forked from the pool's warm child that loaded it.
        assert later and all(r["app_was_warm"] and r["app_imports_after_fork"] == [] for r in later)
    assert "FL_WORKER_PRELOAD=sklearn" in (run_path / "logs" / "client-0.log").read_text()
    assert "warm child" in (run_path / "logs" / "worker-pool.log").read_text()


def test_what_the_serverapp_saves_lands_in_the_run_folder(example_run):
    run_path, summary, _, _ = example_run
    assert summary["serverapp_files"] == ["serverapp/final_model.pt"]
    saved = subprocess.run([PYTHON, "-c", f"import torch; print(sorted(torch.load({str(run_path / 'serverapp' / 'final_model.pt')!r})))"],
                           capture_output=True, text=True, check=True).stdout
    assert "conv1.weight" in saved and "fc2.bias" in saved
    assert not (run_path.parent / ".appmode-current-run").exists()  # the next ServerApp is not sent here


def test_every_message_ran_in_a_fresh_worker_of_the_hosts_one_pool(example_run):
    run_path, _, records, _ = example_run
    trains = [r for r in records if r["message_type"] == "train"]
    assert len(trains) == CLIENTS * 2
    assert all(r["outcome"] == "ok" for r in records)
    assert len({r["pid"] for r in records}) == len(records)  # a new process for every message
    pool_pid = int(re.search(r"ready at .* \(pid (\d+),", (run_path / "logs" / "worker-pool.log").read_text()).group(1))
    assert {r["parent_pid"] for r in records} == {pool_pid}  # one warm process for the whole host: the pool (its workers' parent)
    assert all(r["forkserver_pid"] is None for r in records)  # no node started a warm process of its own


def test_never_more_workers_at_once_than_slots(example_run):
    _, summary, records, _ = example_run
    events = sorted([(r["worker_started_at"], 1) for r in records] + [(r["worker_ended_at"], -1) for r in records], key=lambda e: (e[0], e[1]))
    alive = peak = 0
    for _, change in events:
        alive += change
        peak = max(peak, alive)
    slots = {r["slots"] for r in records}
    assert len(slots) == 1 and peak <= slots.pop()
    assert summary["concurrent_workers_peak"]["cpu"] == peak


def test_partitions_are_distinct_and_cover_the_federation(example_run):
    _, summary, records, _ = example_run
    by_node = {}
    for record in records:
        assert by_node.setdefault(record["node"], record["partition"]) == record["partition"]
        assert record["num_partitions"] == CLIENTS
    assert sorted(by_node.values()) == [0, 1, 2]
    assert summary["partitions"] == by_node  # identity -> partition, as in task mode


def test_the_memory_monitor_attributes_every_messages_worker_to_its_replica(example_run):
    import csv

    run_path, _, records, _ = example_run
    with open(run_path / "memory.csv") as rows:
        table = [row for row in csv.DictReader(rows) if row["kind"] == "process"]
    workers = {int(row["pid"]): row["replica"] for row in table if row["role"] == "worker"}
    assert {row["replica"] for row in table if row["role"] == "client"} == {"client-0", "client-1", "client-2"}
    seen = [record for record in records if record["pid"] in workers]
    assert seen, "no message's worker was sampled"
    assert all(workers[record["pid"]] == record["node"] for record in seen)
    memory = json.loads((run_path / "memory_summary.json").read_text())
    assert memory["verdict"]["ok"] is True, memory["verdict"]["text"]
    assert (run_path / "report.html").is_file()


def test_the_token_is_in_no_record_and_no_log(example_run):
    run_path, _, records, _ = example_run
    assert all("--token" not in json.dumps(r) for r in records)
    for log in (run_path / "logs").iterdir():
        text = log.read_text()
        for line in text.splitlines():
            if "--token" in line:
                assert "--token ***" in line, line


BROKEN_SERVER = '''
import a_module_that_is_not_there  # flwr run's own check reads the file for `app`; only Flower's ServerApp process imports it

from flwr.serverapp import ServerApp

app = ServerApp()
'''


def test_a_serverapp_that_does_not_import_fails_the_run(tmp_path):
    app = app_with(tmp_path, "server_app.py", BROKEN_SERVER)
    done, run_path = run_app(app, tmp_path, 1, 1)
    summary = json.loads((run_path / "summary.json").read_text())
    assert done.returncode != 0
    assert summary["status"] == "failed" and summary["flwr_status"] != "finished:completed"
    assert "Flower reports the run as" in summary["cause"]


FAILING_CLIENT = '''
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    raise ValueError("the data of this node cannot be read")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    raise ValueError("the data of this node cannot be read")
'''


def test_a_run_whose_every_clientapp_reply_is_an_error_fails(tmp_path):
    app = app_with(tmp_path, "client_app.py", FAILING_CLIENT)
    done, run_path = run_app(app, tmp_path, 2, 1)
    summary = json.loads((run_path / "summary.json").read_text())
    assert done.returncode != 0, "Flower's own flwr run exits 0 here; Bouquet's run must not"
    assert summary["flwr_status"] == "finished:completed"  # what Flower says
    assert summary["status"] == "failed" and "every ClientApp message failed" in summary["cause"]
    assert "the data of this node cannot be read" in summary["cause"]
    assert {r["outcome"] for r in messages(run_path)} == {"app_error"}


def test_a_message_the_node_cannot_serve_fails_visibly_and_the_run_ends(tmp_path):
    """The only slot is held by this test: every worker times out waiting for it; each message is
    failed through Flower with that cause (no 30 s relaunch loop, flwr run does not hang)."""
    from services.admission.slots import DeviceSlots

    slots_dir = tmp_path / "slots"
    holder = DeviceSlots(slots_dir, "cpu")
    assert holder.try_take(1) is not None
    try:
        done, run_path = run_app(EXAMPLE, tmp_path, 2, 1, "--worker-slots", "1", "--slots-dir", str(slots_dir), "--worker-timeout", "5", timeout=400)
    finally:
        holder.close()
    summary = json.loads((run_path / "summary.json").read_text())
    records = messages(run_path)
    assert done.returncode != 0
    assert summary["status"] == "failed" and "waiting for a slot" in summary["cause"]
    assert records and all(r["outcome"] == "failed" and r["refused"] for r in records)
    assert {r["message_type"] for r in records} >= {"train"}
    assert len(records) == summary["messages"]["total"] <= 2 * 2  # one launch per message: nothing relaunched
    for node in ("client-0", "client-1"):
        assert "failing the message through Flower" in (run_path / "logs" / f"{node}.log").read_text()


KILLS_ITS_WARM_PROCESS = '''
import os
import signal

from flwr.clientapp import ClientApp

from quickstart_app import client_app as example

app = ClientApp()


@app.train()
def train(msg, context):
    if int(msg.content["config"]["server-round"]) == 1:
        os.kill(os.getppid(), signal.SIGKILL)  # the node's warm forkserver, this worker's parent
    return example.train(msg, context)
'''


def test_a_killed_warm_process_is_said_and_replaced_for_the_next_message(tmp_path):
    app = app_with(tmp_path, "killer_app.py", KILLS_ITS_WARM_PROCESS)
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("quickstart_app.client_app:app", "quickstart_app.killer_app:app").replace("fraction-evaluate = 0.5", "fraction-evaluate = 0.0"))
    done, run_path = run_app(app, tmp_path, 2, 2, "--worker-pool", "replica")  # FedAvg waits for 2 nodes; each node's own warm process
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    records = messages(run_path)
    for node in ("client-0", "client-1"):
        first, second = [r for r in records if r["node"] == node]
        # The message whose worker killed the warm process: the node says it lost track of it, and why.
        assert first["outcome"] == "lost" and f"warm process (pid {first['forkserver_pid']}) died" in first["cause"]
        assert second["outcome"] == "ok" and second["parent_pid"] == second["forkserver_pid"] != first["forkserver_pid"]


def test_the_app_runs_over_tls_with_bouquets_certificates_and_a_preloading_warm_process(tmp_path):
    done, run_path = run_app(EXAMPLE, tmp_path, 2, 1, "--tls", "--worker-preload", "sklearn")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((run_path / "summary.json").read_text())["status"] == "completed"
    for record in messages(run_path):  # the warm process imported it once: no message imports it again
        assert record["outcome"] == "ok" and "sklearn" not in record["imported_after_fork"] and record["app_imports_after_fork"] == []
    server_log = (run_path / "logs" / "server.log").read_text()
    assert "flower-superlink" in server_log and "insecure" not in server_log.lower()  # the SuperLink serves TLS
    for node in ("client-0", "client-1"):
        assert "Starting insecure channel" not in (run_path / "logs" / f"{node}.log").read_text()  # SuperNode -> SuperLink


def test_ctrl_c_stops_flowers_run_and_records_its_end(tmp_path):
    """Ctrl-C on the launcher mid-run: the submission stops Flower's run, summary.json says
    "interrupted" with the cause, the rounds so far are kept, the ServerApp's folder marker is
    gone, and the launcher exits 130. Before that, while the run goes: round 1 is in
    metrics.jsonl and in the server's Prometheus round gauges."""
    results, gauges = tmp_path / "results", free_port()
    launcher = subprocess.Popen(
        [PYTHON, "scripts/run_local.py", "--app", str(EXAMPLE), "--clients", "2", "--app-run-config", "num-server-rounds=50",
         "--results-dir", str(results), "--data-dir", str(tmp_path / "data"), "--run-id", "stopped", "--server-metrics-port", str(gauges)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen = []
    try:
        for line in launcher.stdout:  # wait for the event: Flower has started round 2
            seen.append(line)
            if "[ROUND 2/50]" in line:
                break
        scraped = _scrape_until(f"http://127.0.0.1:{gauges}/metrics", "bouquet_server_round 1.0", timeout=120)
        assert 'bouquet_server_round_clients{outcome="ok"} 2.0' in scraped, scraped
        assert json.loads((results / "stopped" / "metrics.jsonl").read_text().splitlines()[0])["round"] == 1
        launcher.send_signal(signal.SIGINT)
        rest, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, "".join(seen)[-2000:] + (rest or "")[-2000:]
    summary = json.loads((results / "stopped" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "stopped (SIGTERM or Ctrl-C) while it ran" in summary["cause"], summary
    assert summary["flwr_run_id"] and summary["messages"]["total"] >= 2  # round 1's messages are recorded
    assert not (results / ".appmode-current-run").exists()


def _scrape_until(url: str, wanted: str, timeout: float) -> str:
    """The endpoint's text once it holds ``wanted`` (the event: the gauges got the round)."""
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            text = ""
        if wanted in text:
            return text
        time.sleep(0.5)
    raise AssertionError(f"{wanted!r} not served at {url} within {timeout:g} s: {text[-1500:]}")


HOSTILE_CLIENT = '''
import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from quickstart_app import client_app as example

app = ClientApp()
SPOILED = {1: "NaN", 2: "a wrong shape", 3: "a renamed array"}  # what partition 1 sends back in each round


def _hostile(context):
    return int(context.node_config["partition-id"]) == 1


@app.train()
def train(msg, context):
    if not _hostile(context):
        return example.train(msg, context)
    arrays = {key: array.numpy() for key, array in msg.content["arrays"].items()}
    spoiled = int(msg.content["config"]["server-round"])
    if spoiled == 1:
        arrays["fc2.bias"] = np.full_like(arrays["fc2.bias"], np.nan)
    elif spoiled == 2:
        arrays["fc2.bias"] = np.zeros(11, np.float32)
    else:
        arrays["fc2.offset"] = arrays.pop("fc2.bias")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord({"train_loss": 0.1, "num-examples": 1000})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg, context):
    reply = example.evaluate(msg, context)
    if not _hostile(context) or int(msg.content["config"]["server-round"]) == 3:
        return reply
    metrics = dict(reply.content["metrics"])
    metrics.update({"num-examples": 0} if int(msg.content["config"]["server-round"]) == 1 else {"eval_loss": float("nan")})
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
'''


def test_a_node_whose_replies_are_poison_is_refused_and_the_run_completes_with_a_finite_model(tmp_path):
    """Flower's quickstart App shape, its ServerApp's FedAvg unchanged; partition 1 sends back NaN,
    a wrong shape, a renamed array, num-examples 0 and a NaN metric. Each reply is refused in the
    ServerApp's process, reaches FedAvg as a failed reply and is recorded with its reason; the
    honest node's updates make the final model. FL_MAX_UPDATE_NORM reaches the ServerApp too."""
    app = app_with(tmp_path, "hostile_app.py", HOSTILE_CLIENT)
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("quickstart_app.client_app:app", "quickstart_app.hostile_app:app").replace("fraction-evaluate = 0.5", "fraction-evaluate = 1.0"))
    done, run_path = run_app(app, tmp_path, 2, 3, "--max-update-norm", "1000")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads((run_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    records = messages(run_path)
    refused = [(r["message_type"], r["reason"]) for r in records if r["outcome"] == "refused"]
    assert refused == [
        ("train", "ArrayRecord 'arrays': array 'fc2.bias': 10 of 10 values are not finite (NaN)"),
        ("evaluate", "MetricRecord 'metrics': num-examples 0, expected a positive integer"),
        ("train", "ArrayRecord 'arrays': array 'fc2.bias': shape (11,), expected (10,)"),
        ("evaluate", "MetricRecord 'metrics': metric 'eval_loss' is nan"),
        ("train", "ArrayRecord 'arrays': arrays missing 'fc2.bias'; not sent 'fc2.offset'"),
    ]
    assert {(r["node"], r["partition"]) for r in records if r["outcome"] == "refused"} == {("client-1", 1)}
    assert summary["updates_rejected"] == 3 and summary["messages"] == {"total": 12, "ok": 7, "refused": 5}
    honest = [r for r in records if r["message_type"] == "train" and r["outcome"] == "ok"]
    assert len(honest) == 3 and all(0 < r["update_norm"] < 1000 and "clipped_from_norm" not in r for r in honest)
    assert (run_path / "flwr-run.log").read_text().count("Bouquet refused this reply") >= 5  # FedAvg logged each as a failure
    lines = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["clients_rejected"] for line in lines] == [1, 1, 1] and all(line["trained"] for line in lines)
    finite = subprocess.run([PYTHON, "-c", "import sys, torch; m = torch.load(sys.argv[1]); print(len(m), all(bool(torch.isfinite(t).all()) for t in m.values()))",
                             str(run_path / "serverapp" / "final_model.pt")], capture_output=True, text=True, check=True).stdout.split()
    assert finite == ["8", "True"]


def test_a_replica_killed_mid_run_is_recorded_failed_then_absent_and_the_run_goes_on(tmp_path):
    """A replica SIGKILLed as round 3 starts (agent, SuperNode, SuperExec: its whole process group,
    as `docker kill` does): the ServerApp stops waiting for it at once, the round ends, and every
    round from then on records its partition as failed (with the cause) or missing, in
    metrics.jsonl and summary.json; the two other replicas finish the run."""
    results, rounds, killed = tmp_path / "results", 5, "client-2"
    launcher = subprocess.Popen(
        [PYTHON, "scripts/run_local.py", "--app", str(EXAMPLE), "--clients", "3", "--app-run-config", f"num-server-rounds={rounds}",
         "--worker-timeout", "20", "--results-dir", str(results), "--data-dir", str(tmp_path / "data"), "--run-id", "killed"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen = []
    try:
        for line in launcher.stdout:  # the event: Flower has started round 3
            seen.append(line)
            if f"[ROUND 3/{rounds}]" in line:
                break
        agent = next(p for p in psutil.Process(launcher.pid).children(recursive=True) if p.environ().get("FL_CLIENT_ID") == killed and "services.client" in p.cmdline())
        os.killpg(agent.pid, signal.SIGKILL)  # its own session (the launcher's start_new_session): the replica's whole tree
        rest, _ = launcher.communicate(timeout=420)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    output = "".join(seen)[-3000:] + (rest or "")[-3000:]
    assert launcher.returncode == 0, output
    run = results / "killed"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    partition = 2  # partitions are given in name order: client-2 holds 2
    assert [line["round"] for line in lines] == list(range(1, rounds + 1)), output

    def miss(line: dict) -> str | None:
        for failure in line["failures"]:
            if failure["partition"] == partition:
                return f"failed: {failure['cause']}"
        return next((f"missing: {gap['reason']}" for gap in line["missing"] if gap["partition"] == partition), None)

    assert [miss(line) for line in lines[:2]] == [None, None]
    later = [miss(line) for line in lines[2:]]
    assert all(later), later  # every round from the kill on says what happened to partition 2
    assert any(f"replica {killed} stopped" in why for why in later if why.startswith("failed")) or all(why.startswith("missing") for why in later), later
    assert all(line["clients_ok"] == 2 for line in lines[2:]), [line["clients_ok"] for line in lines]
    assert summary["status"] == "completed" and summary["rounds_completed"] == rounds
    assert summary["rounds_missed_by_partition"][str(partition)]["missed"] == rounds - 2, summary["rounds_missed_by_partition"]
    assert f"partition {partition} missed {rounds - 2} of {rounds} rounds" in rest, rest[-1500:]  # the launcher's last lines say so
