"""Issue 19: the join token (services/joining.py) as settings, files and proofs. Over real gRPC:
tests/test_hostile_clients.py."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from conftest import PYTHON, REPO
from services import joining, launcher
from services import settings as settings_module
from services.settings import ClientSettings, ServerSettings, SettingError

TOKEN = "0123456789abcdef-a-test-token"


def test_a_proof_holds_for_its_nonce_and_identity_only():
    proof = joining.proof(TOKEN, "nonce-1", "client-a")
    assert TOKEN not in proof
    assert joining.verified(TOKEN, "nonce-1", "client-a", proof)
    assert not joining.verified(TOKEN, "nonce-2", "client-a", proof)  # replayed on another connection
    assert not joining.verified(TOKEN, "nonce-1", "client-b", proof)  # another identity
    assert not joining.verified("another-token-of-length", "nonce-1", "client-a", proof)
    assert not joining.verified(TOKEN, "nonce-1", "client-a", None)
    assert joining.new_nonce() != joining.new_nonce()


def test_the_token_comes_from_the_setting_or_the_first_line_of_its_file(tmp_path):
    assert joining.token_of(None, None) is None
    assert joining.token_of(TOKEN, None) == TOKEN
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert joining.token_of(None, str(tmp_path / "token")) == TOKEN
    with pytest.raises(SettingError, match="both set"):
        joining.token_of(TOKEN, str(tmp_path / "token"))
    with pytest.raises(SettingError, match=r"FL_JOIN_TOKEN_FILE = .*missing.*cannot read it"):
        joining.token_of(None, str(tmp_path / "missing"))
    (tmp_path / "short").write_text("short\n")
    with pytest.raises(SettingError, match="its first line must be at least 16 characters") as refused:
        joining.token_of(None, str(tmp_path / "short"))
    assert "short'" not in str(refused.value).split("=", 1)[1].split(":", 1)[1]  # the value itself is not repeated


def test_a_bad_token_is_refused_without_showing_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        settings_module.parse(ClientSettings, [], environ={"FL_JOIN_TOKEN": "tooshort"}, program="services.client")
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "--join-token / FL_JOIN_TOKEN = (hidden)" in error and "tooshort" not in error


def test_the_token_is_recorded_only_as_set(tmp_path):
    values = settings_module.parse(ServerSettings, ["--join-token", TOKEN], environ={})
    assert values.join_token == TOKEN
    recorded = settings_module.as_dict(values)
    assert recorded["join_token"] == "(set)" and TOKEN not in repr(recorded)
    assert TOKEN not in repr(values) and TOKEN not in str(values)  # settings printed in a log or a traceback
    assert TOKEN not in repr(settings_module.parse(ClientSettings, [], environ={"FL_JOIN_TOKEN": TOKEN}))
    assert settings_module.as_dict(settings_module.parse(ServerSettings, [], environ={}))["join_token"] is None


def test_the_server_and_client_validate_the_token_file_before_starting(tmp_path):
    """Exit 2 naming the setting, nothing started (no run folder)."""
    for program in ("services.server", "services.client"):
        done = subprocess.run([PYTHON, "-m", program, "--join-token-file", str(tmp_path / "absent"), "--results-dir", str(tmp_path / "results")]
                              if program == "services.server" else [PYTHON, "-m", program, "--join-token-file", str(tmp_path / "absent")],
                              cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 2, done.stderr
        assert "--join-token-file / FL_JOIN_TOKEN_FILE" in done.stderr and "cannot read it" in done.stderr
    assert not (tmp_path / "results").exists()


def test_a_deployment_token_is_made_once_and_readable_by_owner_and_group_only(tmp_path):
    path = tmp_path / "secrets" / "join-token"
    assert joining.write_token(path)
    first = path.read_text()
    assert len(first.strip()) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o440
    assert not joining.write_token(path) and path.read_text() == first  # a later `up` keeps it
    assert joining.token_of(None, str(path)) == first.strip()


def test_the_one_shot_service_never_prints_the_token(tmp_path):
    path = tmp_path / "join-token"
    done = subprocess.run([PYTHON, "-m", "services.joining", str(path)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "token created" in done.stderr and path.read_text().strip() not in done.stderr + done.stdout


def test_the_launcher_hands_its_token_over_in_a_private_file():
    made = [launcher.join_token_file(None), launcher.join_token_file(TOKEN)]
    try:
        for path in made:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert joining.token_of(None, str(made[0])) != TOKEN and joining.token_of(None, str(made[1])) == TOKEN
    finally:
        for path in made:
            path.unlink()
            path.parent.rmdir()
