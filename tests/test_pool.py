"""The host worker pool (services.pool), real processes over its real Unix socket: every job of
every asker runs in a fresh process forked from the one pool, failures keep their kinds, an
asker that dies takes its workers with it, a pool that dies fails its jobs with that cause and a
new pool serves the next job, and a wrong socket, another deployment's pool or missing preloads
are refused naming the setting."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from services import worker
from services.admission.gate import Admission
from services.failures import Kind
from services.pool import wire
from services.pool.use import PoolProblem, start_workers
from services.settings import ClientSettings

from conftest import PYTHON, REPO

pytestmark = pytest.mark.integration

TESTS = str(REPO / "tests")


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class RunningPool:
    """``python -m services.pool`` as compose and the launcher start it (settings from the environment)."""

    def __init__(self, slots: Path, preload: str = "", lifetime: str = "forever") -> None:
        self.slots = slots
        self.socket = wire.default_socket(str(slots))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, str(REPO)]), "FL_SLOTS_DIR": str(slots), "FL_WORKER_PRELOAD": preload,
               "FL_WORKER_POOL_LIFETIME": lifetime}
        self.log = slots.parent / f"pool-{time.monotonic_ns()}.log"  # a file: a worker that outlives the pool cannot hold it open
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([PYTHON, "-m", "services.pool"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.facts, self.session = wire.hello(self.socket, 120)  # answers once it has imported torch and listens

    def workers(self) -> list[psutil.Process]:
        return [child for child in psutil.Process(self.process.pid).children() if child.status() != psutil.STATUS_ZOMBIE]

    def stop(self) -> str:
        self.session.close()
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(120)
        return self.log.read_text()


@pytest.fixture
def slots(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return tmp_path / "slots"


@pytest.fixture
def pool(slots: Path):
    running = RunningPool(slots)
    worker.use_pool(worker.PoolUse(running.socket, "client", "replica-a"), str(slots), [], 0)
    yield running
    worker.leave_pool()
    running.stop()


def asker(socket_path: str, slots: Path, job: str, kwargs: dict) -> subprocess.Popen:
    """Another replica: a process of its own that sends one job to the pool."""
    code = (
        "import sys; from services import worker\n"
        f"worker.use_pool(worker.PoolUse({socket_path!r}, 'client', 'replica-b'), {str(slots)!r}, [], 0)\n"
        f"worker.run({job!r}, {kwargs!r}, timeout=600, start_method='forkserver')\n"
    )
    return subprocess.Popen([PYTHON, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, str(REPO)])})


def test_every_job_runs_in_a_fresh_process_forked_by_the_pool(pool):
    own_forkserver = worker.forkserver_pid()  # an earlier test of this process may have started one
    results = [worker.run("worker_jobs:report_pid", {"value": 21}, timeout=60, start_method="forkserver") for _ in range(3)]
    assert [r.value["value"] for r in results] == [42, 42, 42]
    assert {r.value["parent"] for r in results} == {pool.facts.pid}
    assert len({r.pid for r in results}) == 3 and all(r.pid == r.value["pid"] for r in results)
    assert worker.forkserver_pid() == own_forkserver  # the jobs started no warm process of this process's own
    wait_until(lambda: not pool.workers(), what="the workers to be reaped")


def test_the_pool_preloads_torch_so_a_worker_starts_warm(pool):
    result = worker.run("worker_jobs:imported", {"module": "torch"}, timeout=60, start_method="forkserver")
    assert result.value is True


def test_a_job_that_names_a_warm_key_forks_from_the_pools_warm_child_which_warmed_once(pool):
    warm = worker.Warm("worker_jobs:warm_up", "app-1")
    results = [worker.run("worker_jobs:what_was_warm", {}, timeout=60, start_method="forkserver", warm=warm) for _ in range(3)]
    warmed_in = {r.value["warmed"].get("app-1") for r in results}
    assert len(warmed_in) == 1 and None not in warmed_in  # every worker started with the one warm-up done
    assert warmed_in.pop() not in (pool.facts.pid, *(r.pid for r in results))  # ... done once, in a child of its own
    assert {r.value["parent"] for r in results} == {pool.facts.pid}  # the pool adopted, reaped and reported each worker
    other = worker.run("worker_jobs:what_was_warm", {}, timeout=60, start_method="forkserver")
    assert other.value["warmed"] == {}  # a job that names no key forks from the pool itself
    log = pool.stop()
    assert log.count("warm child") == 2 and "ready for app-1" in log  # started once, ready once


def test_a_key_that_cannot_warm_forks_its_jobs_from_the_pool_and_says_why(pool):
    warm = worker.Warm("worker_jobs:warm_up", "cannot-warm")
    results = [worker.run("worker_jobs:what_was_warm", {}, timeout=60, start_method="forkserver", warm=warm) for _ in range(2)]
    assert all(r.value["warmed"] == {} and r.value["parent"] == pool.facts.pid for r in results)
    log = pool.stop()
    assert "could not warm cannot-warm (ImportError: no module named 'missing_app')" in log and log.count("warm child") == 1


def test_jobs_queued_for_a_warm_child_that_dies_fork_from_the_pool(pool):
    result = worker.run("worker_jobs:what_was_warm", {}, timeout=60, start_method="forkserver", warm=worker.Warm("worker_jobs:warm_up", "warm-then-die"))
    assert result.value["warmed"] == {} and result.value["parent"] == pool.facts.pid


def test_at_most_two_warm_children_live_the_least_recently_used_goes(pool):
    for key in ("app-1", "app-2", "app-3"):
        worker.run("worker_jobs:what_was_warm", {}, timeout=60, start_method="forkserver", warm=worker.Warm("worker_jobs:warm_up", key))
    wait_until(lambda: len(pool.workers()) == 2, what="the oldest warm child to go")
    assert "for app-1 dropped" in pool.log.read_text()


def test_a_running_worker_is_recorded_for_the_replica_that_asked(pool, slots):
    records = Path(wire.records_dir(pool.socket))
    other = asker(pool.socket, slots, "worker_jobs:sleep_forever", {})
    try:
        wait_until(lambda: list(records.glob("*.json")), what="the worker's record")
        (record_file,) = records.glob("*.json")
        record = wire.read_record(str(record_file))
        assert record["identity"] == "replica-b" and record["role"] == "client" and record["pid"] == other.pid
        assert int(record_file.stem) in {w.pid for w in pool.workers()}
    finally:
        other.kill()
        other.wait()
    wait_until(lambda: not list(records.glob("*.json")), what="the record to go with the worker")


@pytest.mark.parametrize(
    "job, kind, cause",
    [
        ("worker_jobs:raise_error", Kind.TASK_ERROR, "ValueError: bad partition"),
        ("worker_jobs:kill_self", Kind.KILLED, "killed by SIGKILL"),
        ("worker_jobs:exit_quietly", Kind.TASK_ERROR, "exited with code 3 without sending a result"),
    ],
)
def test_failures_keep_their_kind_and_cause_through_the_pool(pool, job, kind, cause):
    with pytest.raises(worker.WorkerFailed) as failed:
        worker.run(job, {}, timeout=60, start_method="forkserver")
    assert failed.value.kind is kind
    assert cause in failed.value.cause
    wait_until(lambda: not pool.workers(), what="the failed worker to be reaped")


def test_a_job_past_its_timeout_is_killed_and_gone(pool):
    with pytest.raises(worker.WorkerFailed) as failed:
        worker.run("worker_jobs:sleep_forever", {}, timeout=1, start_method="forkserver")
    assert failed.value.kind is Kind.TIMED_OUT and "FL_WORKER_TIMEOUT" in failed.value.cause
    wait_until(lambda: not pool.workers(), timeout=10, what="the timed-out worker to die")


def test_large_results_come_back_whole(pool):
    result = worker.run("worker_jobs:large_result", {"megabytes": 64}, timeout=120, start_method="forkserver")
    assert len(result.value) == 64 * 2**20


def test_a_killed_replica_takes_its_running_and_queued_workers_with_it_and_frees_their_slots(pool, slots):
    """One slot: replica B's first worker holds it, its second waits for it; SIGKILL B and both
    workers are gone, and our own job gets the slot at once."""
    admission = Admission(slots_dir=str(slots), slots=1, device="cpu")
    holder = asker(pool.socket, slots, "worker_jobs:sleep_forever", {})
    code = (
        "from services import worker; from services.admission.gate import Admission; import threading\n"
        f"worker.use_pool(worker.PoolUse({pool.socket!r}, 'client', 'replica-b'), {str(slots)!r}, [], 0)\n"
        f"a = Admission(slots_dir={str(slots)!r}, slots=1, device='cpu')\n"
        "run = lambda: worker.run('worker_jobs:sleep_forever', {}, timeout=600, start_method='forkserver', admission=a)\n"
        "threading.Thread(target=run).start(); run()\n"
    )
    holder.kill()
    holder.wait()
    replica = subprocess.Popen([PYTHON, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, str(REPO)])})
    try:
        wait_until(lambda: len(pool.workers()) == 2, what="a running and a queued worker")
        replica.kill()
        replica.wait()
        wait_until(lambda: not pool.workers(), timeout=5, what="both workers to die with their replica")
        result = worker.run("worker_jobs:hold", {"seconds": 0}, timeout=60, start_method="forkserver", admission=admission, wait_timeout=5)
        assert result.admitted["slot_wait_seconds"] < 1
    finally:
        replica.kill()


def test_a_pool_that_dies_fails_its_running_job_with_that_cause_and_a_new_pool_serves_the_next(slots):
    first = RunningPool(slots)
    worker.use_pool(worker.PoolUse(first.socket, "client", "replica-a"), str(slots), [], 0)
    outcome: dict = {}

    def job() -> None:
        try:
            worker.run("worker_jobs:sleep_forever", {}, timeout=600, start_method="forkserver")
        except worker.WorkerFailed as failure:
            outcome["failure"] = failure

    runner = threading.Thread(target=job)
    try:
        runner.start()
        records = Path(wire.records_dir(first.socket))
        wait_until(lambda: list(records.glob("*.json")), what="the job's worker")
        (record,) = records.glob("*.json")
        orphan = psutil.Process(int(record.stem))
        first.process.kill()
        runner.join(30)
        assert outcome["failure"].kind is Kind.KILLED
        assert outcome["failure"].cause.startswith(worker.POOL_EXITED)
        wait_until(lambda: not psutil.pid_exists(orphan.pid) or psutil.Process(orphan.pid).status() == psutil.STATUS_ZOMBIE, what="the worker to die with its pool")
        second = RunningPool(slots)  # as compose restarts it: same socket, stale file replaced
        try:
            result = worker.run("worker_jobs:report_pid", {"value": 1}, timeout=60, start_method="forkserver")
            assert result.value["parent"] == second.facts.pid
        finally:
            second.stop()
    finally:
        worker.leave_pool()
        first.stop()


def test_a_replica_that_starts_before_the_pool_waits_for_it(slots, caplog):
    caplog.set_level(logging.INFO, logger="bouquet.pool")
    settings = ClientSettings(worker_pool="host", slots_dir=str(slots), worker_pool_wait=120.0)
    started: dict = {}
    thread = threading.Thread(target=lambda: started.setdefault("error", _start(settings)))
    thread.start()
    try:
        wait_until(lambda: "waiting up to 120 s" in caplog.text, what="the one waiting line")
        running = RunningPool(slots)
        thread.join(60)
        assert started["error"] is None
        assert worker._pool and worker._pool[0].identity == "replica-a"
        running.stop()
    finally:
        worker.leave_pool()


def _start(settings: ClientSettings) -> Exception | None:
    try:
        start_workers(settings, "client", "replica-a")
    except Exception as error:
        return error
    return None


def test_no_pool_within_the_wait_is_one_clear_error(slots):
    settings = ClientSettings(worker_pool="host", slots_dir=str(slots), worker_pool_wait=0.5)
    with pytest.raises(PoolProblem) as problem:
        start_workers(settings, "client", "replica-a")
    assert problem.value.exit_code == 1
    assert "FL_WORKER_POOL_WAIT" in str(problem.value) and "FL_WORKER_POOL=replica" in str(problem.value)


def test_a_socket_setting_that_is_no_socket_is_a_bad_setting_and_starts_nothing(tmp_path):
    not_a_socket = tmp_path / "pool.sock"
    not_a_socket.write_text("")
    common = ["--worker-pool-socket", str(not_a_socket), "--data-dir", str(tmp_path / "data")]
    for program, extra in (("services.pool", []), ("services.client", ["--worker-pool", "host", "--client-id", "c0"]),
                           ("services.server", ["--worker-pool", "host", "--results-dir", str(tmp_path / "results")])):
        run = subprocess.run([PYTHON, "-m", program, *common, *extra], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, (program, run.stderr)
        assert "FL_WORKER_POOL_SOCKET" in run.stderr and "is not a Unix socket" in run.stderr, (program, run.stderr)
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()


def test_the_pool_of_another_deployment_and_missing_preloads_are_refused_naming_the_setting(tmp_path, slots):
    running = RunningPool(slots)
    try:
        elsewhere = tmp_path / "other-slots"
        with pytest.raises(wire.PoolUnusable, match="another deployment.*FL_SLOTS_DIR"):
            worker.use_pool(worker.PoolUse(running.socket, "client", "x"), str(elsewhere), [], 0)
        with pytest.raises(wire.PoolUnusable, match="FL_WORKER_PRELOAD=json.*did not preload json"):
            worker.use_pool(worker.PoolUse(running.socket, "client", "x"), str(slots), ["json"], 0)
        assert not worker._pool
        with pytest.raises(wire.PoolUnusable, match="another worker pool is serving it"):
            from services.pool.server import Pool

            Pool(running.socket, str(slots), []).bind()
    finally:
        running.stop()


def test_a_pool_with_the_preloads_serves_them(slots):
    running = RunningPool(slots, preload="json")
    try:
        worker.use_pool(worker.PoolUse(running.socket, "client", "x"), str(slots), ["json"], 0)
        assert worker.run("worker_jobs:imported", {"module": "json"}, timeout=60, start_method="forkserver").value is True
    finally:
        worker.leave_pool()
        running.stop()


def test_sigterm_stops_the_pool_and_its_socket_goes(slots):
    running = RunningPool(slots)
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(30) == 0
    assert not os.path.exists(running.socket)
    assert "ready at" in running.stop()


def test_the_pool_exits_once_every_asker_has_gone_and_no_worker_runs(slots):
    """FL_WORKER_POOL_LIFETIME=askers (compose's and the launcher's): the run is over when the
    server and every replica that said hello have gone, so `docker compose up` returns."""
    running = RunningPool(slots, lifetime="askers")
    try:
        code = (
            "import sys; from services import worker\n"
            f"worker.use_pool(worker.PoolUse({running.socket!r}, 'client', sys.argv[1]), {str(slots)!r}, [], 0)\n"
            "worker.run('worker_jobs:report_pid', {'value': 1}, timeout=60, start_method='forkserver')\n"
            "print('trained', flush=True); sys.stdin.read()\n"  # stays until the test closes its stdin
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, str(REPO)])}
        askers = [subprocess.Popen([PYTHON, "-c", code, f"replica-{i}"], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                  for i in range(2)]
        assert [asker.stdout.readline() for asker in askers] == ["trained\n"] * 2
        running.session.close()  # the test's own hello: only the two replicas are left
        askers[0].stdin.close()
        askers[0].wait(60)
        with pytest.raises(subprocess.TimeoutExpired):
            running.process.wait(1)  # one asker is left
        askers[1].stdin.close()
        askers[1].wait(60)
        assert running.process.wait(30) == 0
        assert "has gone (" in running.stop()
    finally:
        for process in askers:
            process.kill()
        running.stop()


def test_a_pool_in_a_folder_deeper_than_a_socket_address_allows_still_serves(tmp_path):
    """A Unix socket address holds 107 bytes; a data folder deep in a user's tree is longer."""
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 5) / "slots"
    deep.parent.mkdir(parents=True)
    assert len(wire.default_socket(str(deep))) > wire.MAX_SOCKET_PATH
    running = RunningPool(deep)
    try:
        worker.use_pool(worker.PoolUse(running.socket, "client", "replica-a"), str(deep), [], 0)
        assert worker.run("worker_jobs:report_pid", {"value": 1}, timeout=60, start_method="forkserver").value["parent"] == running.facts.pid
    finally:
        worker.leave_pool()
        running.stop()
