"""services.lifetime with real child processes: a stop asks (SIGTERM), gives the grace, then kills
(SIGKILL), the whole session of a child started in its own; ``ended`` reads /proc. The tests wait
on the processes' own events (a line they print, their exit), never on a fixed sleep."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from conftest import PYTHON, REPO
from services import lifetime

# Each prints one line once its signal handling is in place, then waits for a signal.
EXITS_ON_TERM = "print('ready', flush=True)\nimport signal\nwhile True: signal.pause()"
IGNORES_TERM = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\nwhile True: signal.pause()"
# A session leader that starts a grandchild ignoring SIGTERM; the grandchild prints its pid.
GRANDCHILD = "import os, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(os.getpid(), flush=True)\nwhile True: signal.pause()"
LEADER = ("import signal, subprocess, sys\n"
          "if sys.argv[1] == 'ignore': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
          "subprocess.Popen([sys.executable, '-c', sys.argv[2]])\n"
          "while True: signal.pause()")


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    """Children a test starts; whatever a failing test left running is killed, its session too."""
    children: list[subprocess.Popen] = []
    yield children
    for child in children:
        if getattr(child, "own_session", False):
            lifetime.signal_group(child.pid, signal.SIGKILL)
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def ready(children: list[subprocess.Popen], code: str) -> subprocess.Popen:
    """A child running ``code``, once it said it is ready."""
    child = lifetime.start([PYTHON, "-c", code], stdout=subprocess.PIPE, text=True)
    children.append(child)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    return child


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_a_child_that_ends_on_sigterm_is_not_killed(started):
    child = ready(started, EXITS_ON_TERM)
    assert lifetime.stop(child, grace=60) == -signal.SIGTERM


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(started):
    child = ready(started, IGNORES_TERM)
    asked = time.monotonic()
    assert lifetime.stop(child, grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - asked >= 0.5


def test_the_first_signal_is_the_one_asked_for(started):
    child = ready(started, "import signal, sys\nsignal.signal(signal.SIGINT, lambda *_: sys.exit(7))\nprint('ready', flush=True)\nwhile True: signal.pause()")
    assert lifetime.stop(child, grace=60, sig=signal.SIGINT) == 7


def test_a_session_whose_leader_ignores_sigterm_is_killed_whole_after_the_grace(started):
    """The launcher's way: the signal to the leader only, the SIGKILL to its whole session."""
    leader = lifetime.start([PYTHON, "-c", LEADER, "ignore", GRANDCHILD], own_session=True, stdout=subprocess.PIPE, text=True)
    started.append(leader)
    assert leader.stdout is not None
    grandchild = int(leader.stdout.readline())
    assert lifetime.stop(leader, grace=0.3) == -signal.SIGKILL
    assert lifetime.ended(grandchild, patience=30)


def test_whole_group_kills_what_the_leader_left_behind(started):
    """The benchmarks' way: SIGTERM to the whole group; a grandchild that ignores it is killed
    once its leader has ended, however soon that was."""
    leader = lifetime.start([PYTHON, "-c", LEADER, "exit", GRANDCHILD], own_session=True, stdout=subprocess.PIPE, text=True)
    started.append(leader)
    assert leader.stdout is not None
    grandchild = int(leader.stdout.readline())
    assert lifetime.stop(leader, grace=60, whole_group=True) == -signal.SIGTERM
    assert lifetime.ended(grandchild, patience=30)


def test_whole_group_needs_a_child_that_leads_one(started):
    child = ready(started, EXITS_ON_TERM)
    with pytest.raises(ValueError, match="own_session"):
        lifetime.stop(child, grace=1, whole_group=True)


def test_stopping_an_ended_process_returns_its_code(started):
    child = lifetime.start([PYTHON, "-c", "raise SystemExit(3)"])
    started.append(child)
    assert lifetime.ended(child.pid, patience=30)  # a zombie: not reaped yet
    assert lifetime.stop(child, grace=60) == 3
    assert lifetime.stop(child, grace=60) == 3  # reaped: nothing to signal, nothing to wait for
    lifetime.send(child, signal.SIGTERM)


def test_stop_all_gives_one_grace_to_all(started):
    children = [ready(started, IGNORES_TERM) for _ in range(2)]
    asked = time.monotonic()
    assert lifetime.stop_all(children, grace=2.0) == [-signal.SIGKILL, -signal.SIGKILL]
    assert time.monotonic() - asked < 3.5  # one grace each would take 4 s


def test_wait_says_none_while_it_runs(started):
    child = ready(started, EXITS_ON_TERM)
    assert lifetime.wait(child, 0.05) is None
    lifetime.send(child)
    assert lifetime.wait(child, None) == -signal.SIGTERM


def test_ended_counts_a_zombie_and_a_gone_pid(started):
    child = lifetime.start([PYTHON, "-c", "pass"])
    started.append(child)
    assert lifetime.ended(child.pid, patience=30)
    assert state(child.pid) == "Z"  # its parent (this test) has not reaped it
    assert child.wait() == 0
    assert lifetime.ended(child.pid)


def test_ended_is_false_for_a_live_pid(started):
    child = ready(started, EXITS_ON_TERM)
    assert not lifetime.ended(child.pid)
    assert not lifetime.ended(child.pid, patience=0.1)
    assert not lifetime.ended(os.getpid())


@pytest.mark.parametrize("tied", [True, False])
def test_a_child_dies_with_its_parent_when_asked(started, tied):
    parent = lifetime.start(
        [PYTHON, "-c", f"import sys\nfrom services import lifetime\nchild = lifetime.start(['sleep', '600'], dies_with_parent={tied})\n"
                       "print(child.pid, flush=True)\nsys.stdin.read()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    started.append(parent)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert lifetime.stop(parent, grace=0, sig=signal.SIGKILL) == -signal.SIGKILL
        assert lifetime.ended(child, patience=30 if tied else 0.2) is tied
    finally:
        if not tied:
            os.kill(child, signal.SIGKILL)
        assert parent.stdin is not None
        parent.stdin.close()
