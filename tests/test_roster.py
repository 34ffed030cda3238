"""Replicas announce themselves on the shared data folder; a dead one is never counted."""

from __future__ import annotations

import signal
import subprocess
import sys

from conftest import REPO
from services import roster

HOLD = "import sys; from services import roster; a = roster.announce(sys.argv[1], sys.argv[2]); print('ready' if a else 'refused', flush=True); sys.stdin.read()"


def hold(data_dir, identity) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(data_dir), identity], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_a_running_replica_is_live_and_a_killed_one_is_not(tmp_path):
    alive, doomed = hold(tmp_path, "replica-a"), hold(tmp_path, "replica-b")
    try:
        assert roster.live(tmp_path) == {"replica-a", "replica-b"}
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        assert roster.live(tmp_path) == {"replica-a"}
        assert not (roster.folder(tmp_path) / "replica-b").exists(), "the stale entry is removed"
    finally:
        for process in (alive, doomed):
            process.kill()
            process.wait()


def test_a_replica_that_ends_cleanly_withdraws_its_entry(tmp_path):
    announcement = roster.announce(tmp_path, "replica-a")
    assert announcement is not None and announcement.path.exists()
    announcement.close()
    assert not announcement.path.exists() and roster.live(tmp_path) == set()


def test_a_restarted_replica_announces_again_under_the_same_name(tmp_path):
    first = hold(tmp_path, "replica-a")
    first.kill()
    first.wait()
    again = hold(tmp_path, "replica-a")  # the stale file is still there until the server looks
    try:
        assert roster.live(tmp_path) == {"replica-a"}
    finally:
        again.kill()
        again.wait()


def test_a_live_twin_is_refused_without_blocking(tmp_path):
    holder = hold(tmp_path, "replica-a")
    try:
        assert roster.announce(tmp_path, "replica-a") is None
    finally:
        holder.kill()
        holder.wait()


def test_no_folder_or_an_unusable_identity_means_no_announcement(tmp_path):
    assert roster.live(tmp_path / "nothing-here") == set()
    assert roster.announce(tmp_path, "../escape") is None
    (tmp_path / "file").write_text("")
    assert roster.announce(tmp_path / "file", "replica-a") is None  # data dir is not a folder
