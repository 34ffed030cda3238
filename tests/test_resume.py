"""Resume (issue 12): a server killed mid-run and started again continues the same run from its
last checkpoint; the clients ride out the restart and keep their partitions.

Real processes over gRPC on loopback: a server and 3 clients; the test kills the server (SIGKILL,
or SIGTERM) once round 2 is recorded and starts it again with the same command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO
from services.net import free_port, wait_until_listening
from services.files import read_rounds
from services.server import resume

ROUNDS, CLIENTS = 4, 3


def rounds_recorded(run: Path) -> int:
    try:
        return len(read_rounds(run))
    except FileNotFoundError:
        return 0


@pytest.mark.integration
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_server_started_again_completes_the_same_run(tmp_path, how):
    address = f"127.0.0.1:{free_port()}"
    results, data = tmp_path / "results", tmp_path / "data"
    command = [PYTHON, "-m", "services.server", "--listen-address", address, "--rounds", str(ROUNDS), "--min-clients", str(CLIENTS),
               "--join-grace", "0", "--min-fit-clients", str(CLIENTS), "--dataset", "digits", "--torch-threads", "1",
               "--results-dir", str(results), "--data-dir", str(data)]
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen(command, cwd=REPO, stdout=open(logs / "server-1.log", "w"), stderr=subprocess.STDOUT)
    clients = []
    try:
        wait_until_listening(address, server, timeout=120, name="server")
        for index in range(CLIENTS):
            clients.append(subprocess.Popen(
                [PYTHON, "-m", "services.client", "--server-address", address, "--client-id", f"client-{index}",
                 "--data-dir", str(data), "--torch-threads", "1"],
                cwd=REPO, stdout=open(logs / f"client-{index}.log", "w"), stderr=subprocess.STDOUT,
            ))
        run = None
        deadline = time.monotonic() + 300
        while run is None or rounds_recorded(run) < 2:  # the event: round 2 is on disk
            assert time.monotonic() < deadline and server.poll() is None, (logs / "server-1.log").read_text()[-3000:]
            found = [p for p in results.iterdir() if p.is_dir()] if results.exists() else []
            run = found[0] if found else None
            time.sleep(0.1)
        server.send_signal(how)
        server.wait(timeout=60)
        recorded_before = rounds_recorded(run)
        assert all(client.poll() is None for client in clients), "a client exited when the server went away"

        server = subprocess.Popen(command, cwd=REPO, stdout=open(logs / "server-2.log", "w"), stderr=subprocess.STDOUT)
        restarted = time.monotonic()
        while rounds_recorded(run) <= recorded_before and server.poll() is None:  # the event: the next round is on disk
            assert time.monotonic() - restarted < 300, (logs / "server-2.log").read_text()[-3000:]
            time.sleep(0.1)
        print(f"{how.name}: server restart -> next finished round: {time.monotonic() - restarted:.1f} s")
        assert server.wait(timeout=300) == 0, (logs / "server-2.log").read_text()[-3000:]
        for index, client in enumerate(clients):
            assert client.wait(timeout=60) == 0, (logs / f"client-{index}.log").read_text()[-2000:]
    finally:
        for process in (server, *clients):
            process.kill()
            process.wait()

    assert [p.name for p in results.iterdir() if p.is_dir()] == [run.name], "a second run was started"
    records = read_rounds(run)
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1)), "a round is missing or recorded twice"
    assert summary["status"] == "completed" and summary["rounds_completed"] == ROUNDS
    [restart] = summary["restarts"]
    assert restart["from_round"] == recorded_before + 1
    assert sorted(p.name for p in (run / "checkpoints").glob("*.npz")) == [f"round-{r:04d}.npz" for r in range(1, ROUNDS + 1)]
    partition_of = [{c["id"]: c["partition"] for c in r["clients"]} for r in records]
    assert all(p == partition_of[0] for p in partition_of) and len(partition_of[0]) == CLIENTS, partition_of
    assert summary["partitions"] == partition_of[0]
    assert records[-1]["accuracy"] > records[0]["accuracy"]
    # Every client said it lost the server (once, or again when its first reconnect raced the new
    # server's start) and none crashed.
    for index in range(CLIENTS):
        text = (logs / f"client-{index}.log").read_text()
        assert "lost the server" in text and "Traceback" not in text, text[-2000:]


FINGERPRINT = {"dataset": "digits", "strategy": "fedavg"}


def make_run(results: Path, name: str, fingerprint: dict, status: str | None, created: str) -> Path:
    path = results / name
    (path / "checkpoints").mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"fingerprint": fingerprint, "created_at": created, "restarts": []}))
    (path / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n" + '{"round": 2, "cut by a cra')
    if status:
        (path / "summary.json").write_text(json.dumps({"status": status}))
    return path


def test_the_newest_unfinished_run_with_the_same_settings_is_chosen(tmp_path):
    make_run(tmp_path, "old", FINGERPRINT, "interrupted", "2026-01-01")
    newest = make_run(tmp_path, "newest", FINGERPRINT, None, "2026-02-01")
    make_run(tmp_path, "done", FINGERPRINT, "completed", "2026-03-01")
    make_run(tmp_path, "other", {**FINGERPRINT, "dataset": "cifar10"}, None, "2026-04-01")
    chosen = resume.choose(tmp_path, None, FINGERPRINT, 5)
    assert chosen.path == newest and chosen.last_round == 1  # the cut line is not a round
    assert resume.choose(tmp_path, None, {**FINGERPRINT, "dataset": "synthetic"}, 5) is None


def test_a_named_run_is_continued_only_when_unfinished_and_the_same(tmp_path):
    make_run(tmp_path, "done", FINGERPRINT, "completed", "2026-03-01")
    make_run(tmp_path, "other", {**FINGERPRINT, "dataset": "cifar10"}, None, "2026-04-01")
    with pytest.raises(resume.NotResumable, match="completed run and is never touched"):
        resume.choose(tmp_path, "done", FINGERPRINT, 5)
    with pytest.raises(resume.NotResumable, match="other task settings .*dataset"):
        resume.choose(tmp_path, "other", FINGERPRINT, 5)
    assert resume.choose(tmp_path, "absent", FINGERPRINT, 5) is None
    make_run(tmp_path, "full", FINGERPRINT, None, "2026-05-01")
    with pytest.raises(resume.NotResumable, match="already recorded 1 rounds"):
        resume.choose(tmp_path, "full", FINGERPRINT, 1)


def test_resume_never_starts_a_new_run(tmp_path):
    """Via the real server's start: with FL_RESUME=never an unfinished run of the same settings is left alone."""
    from services.server.__main__ import open_run
    from services.settings import ServerSettings, parse
    from services.taskspec import TaskSpec

    for mode, expect_new in (("never", True), ("auto", False)):
        settings = parse(ServerSettings, ["--results-dir", str(tmp_path), "--resume", mode])
        spec = TaskSpec.from_settings(settings)
        state, resumed = open_run(settings, spec)
        assert (resumed is None) == expect_new, mode
        state.folder.release()  # as the server's exit does
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1


def test_a_run_another_live_server_writes_is_never_resumed_nor_touched(tmp_path):
    """Two servers on one results folder (a second compose project, a second launcher): the
    second neither picks the first's unfinished run nor changes a byte of it; once the first is
    gone (its lock dies with it), the run can be resumed."""
    from services.locks import HeldLock
    from services.server.results import SERVER_LOCK, RunFolder, RunInUse

    live = make_run(tmp_path, "live", FINGERPRINT, "interrupted", "2026-02-01")
    before = {p.name: p.read_bytes() for p in live.iterdir() if p.is_file()}
    first_server = HeldLock(live / SERVER_LOCK)
    assert first_server.acquire()
    assert resume.choose(tmp_path, None, FINGERPRINT, 5) is None
    with pytest.raises(resume.NotResumable, match="being written by another running server"):
        resume.choose(tmp_path, "live", FINGERPRINT, 5)
    with pytest.raises(RunInUse):
        RunFolder.reopen(live)
    assert {p.name: p.read_bytes() for p in live.iterdir() if p.is_file() and p.name != SERVER_LOCK} == before

    first_server.release()  # the first server exited (or was killed: the kernel drops the lock)
    assert resume.choose(tmp_path, None, FINGERPRINT, 5).path == live
    RunFolder.reopen(live)
    assert not (live / "summary.json").exists()


@pytest.mark.integration
def test_a_round_whose_every_client_vanished_is_run_again_not_recorded_empty(tmp_path):
    """`docker compose down` stops the replicas before the server: mid-round, every connection is
    lost. That attempt is not the round (it used to be recorded with nobody trained, and a resume
    then skipped it): the round runs again once the replicas are back, and is recorded once."""
    address = f"127.0.0.1:{free_port()}"
    results, data, records, logs = tmp_path / "results", tmp_path / "data", tmp_path / "records", tmp_path / "logs"
    records.mkdir()
    logs.mkdir()
    task = str(REPO / "tests" / "tasks" / "stalls_in_round_2.py")
    server = subprocess.Popen(
        [PYTHON, "-m", "services.server", "--listen-address", address, "--rounds", "3", "--min-clients", "2", "--join-grace", "0",
         "--min-fit-clients", "2", "--task", task, "--torch-threads", "1", "--results-dir", str(results), "--data-dir", str(data)],
        cwd=REPO, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT,
    )

    def start_clients(generation: int) -> list[subprocess.Popen]:
        return [
            subprocess.Popen(
                [PYTHON, "-m", "services.client", "--server-address", address, "--data-dir", str(data), "--torch-threads", "1"],
                cwd=REPO, stdout=open(logs / f"client-{index}-{generation}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "FL_CLIENT_ID": f"client-{index}", "BOUQUET_TEST_RECORDS": str(records)},
            )
            for index in range(2)
        ]

    clients = []
    try:
        wait_until_listening(address, server, timeout=120, name="server")
        clients = start_clients(1)
        deadline = time.monotonic() + 300
        while not all((records / f"client-{index}-2").exists() for index in range(2)):  # the event: both are in round 2
            assert time.monotonic() < deadline and server.poll() is None, (logs / "server.log").read_text()[-3000:]
            time.sleep(0.05)
        for client in clients:  # every replica gone at once, workers included
            os.killpg(client.pid, signal.SIGKILL)
            client.wait()
        (records / "released").touch()
        clients = start_clients(2)
        assert server.wait(timeout=300) == 0, (logs / "server.log").read_text()[-3000:]
    finally:
        for process in (server, *clients):
            if process.poll() is None:
                process.kill()
                process.wait()

    [run] = [p for p in results.iterdir() if p.is_dir()]
    records_by_round = {r["round"]: r for r in resume.read_rounds(run)}
    assert sorted(records_by_round) == [1, 2, 3]
    assert records_by_round[2]["clients_ok"] == 2 and records_by_round[2]["lost_attempts"] == 1, records_by_round[2]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert "every client's connection was lost during training; running the round again" in (logs / "server.log").read_text()
