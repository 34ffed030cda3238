"""Every bad setting ends with exit code 2 and one line naming the setting, the value and what is allowed."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import PYTHON, REPO
from services import settings
from services.server.__main__ import validate

BAD_SERVER_VALUES = [
    (["--dataset", "mnist"], "FL_DATASET", "must be one of: digits, cifar10, synthetic"),
    (["--rounds", "0"], "FL_ROUNDS", "integer >= 1"),
    (["--rounds", "-3"], "FL_ROUNDS", "integer >= 1"),
    (["--rounds", "two"], "FL_ROUNDS", "integer >= 1"),
    (["--fraction-fit", "0"], "FL_FRACTION_FIT", "(0, 1]"),
    (["--fraction-fit", "1.5"], "FL_FRACTION_FIT", "(0, 1]"),
    (["--dirichlet-alpha", "0"], "FL_DIRICHLET_ALPHA", "> 0"),
    (["--dirichlet-alpha", "-1"], "FL_DIRICHLET_ALPHA", "> 0"),
    (["--listen-address", "localhost"], "FL_LISTEN_ADDRESS", "HOST:PORT"),
    (["--listen-address", "0.0.0.0:99999"], "FL_LISTEN_ADDRESS", "PORT in 1-65535"),
    (["--listen-address", "[zz::1]:8080"], "FL_LISTEN_ADDRESS", "HOST:PORT"),
    (["--min-clients", "0"], "FL_MIN_CLIENTS", "integer >= 1"),
    (["--min-fit-clients", "0"], "FL_MIN_FIT_CLIENTS", "integer >= 1"),
    (["--local-epochs", "0"], "FL_LOCAL_EPOCHS", "integer >= 1"),
    (["--batch-size", "0"], "FL_BATCH_SIZE", "integer >= 1"),
    (["--learning-rate", "0"], "FL_LEARNING_RATE", "> 0"),
    (["--learning-rate", "nan"], "FL_LEARNING_RATE", "> 0"),
    (["--partitioning", "shards"], "FL_PARTITIONING", "iid, dirichlet"),
    (["--seed", "-1"], "FL_SEED", ">= 0"),
    (["--synthetic-samples", "1"], "FL_SYNTHETIC_SAMPLES", "integer >= 10"),
    (["--torch-threads", "-1"], "FL_TORCH_THREADS", "integer >= 0"),
    (["--data-dir", " "], "FL_DATA_DIR", "non-empty path"),
    (["--worker-timeout", "0"], "FL_WORKER_TIMEOUT", "> 0"),
    (["--join-grace", "-1"], "FL_JOIN_GRACE", ">= 0"),
    (["--join-timeout", "0"], "FL_JOIN_TIMEOUT", "> 0"),
    (["--resume", "maybe"], "FL_RESUME", "auto, never"),
    (["--task", "my task"], "FL_TASK", "builtin, a path to a .py file, or an importable module name"),
    (["--strategy-args", "proximal_mu"], "FL_STRATEGY_ARGS", "key=value pairs"),
    (["--client-eval", "maybe"], "FL_CLIENT_EVAL", "true/false"),
    (["--device", "tpu"], "FL_DEVICE", "auto, cpu, cuda"),
    (["--worker-start", "fork"], "FL_WORKER_START", "spawn, forkserver, inprocess"),
    (["--run-id", "../escape"], "FL_RUN_ID", "letters, digits"),
    (["--model", "cifar-cnn"], "FL_MODEL", "digits-cnn"),
    (["--min-fit-clients", "3", "--min-clients", "2"], "FL_MIN_FIT_CLIENTS", "must not exceed"),
    (["--tls-dir", " "], "FL_TLS_DIR", "non-empty path"),
    (["--worker-slots", "0"], "FL_WORKER_SLOTS", "auto, unlimited or an integer in 1-64"),
    (["--worker-slots", "lots"], "FL_WORKER_SLOTS", "auto, unlimited or an integer in 1-64"),
    (["--worker-memory-mib", "0"], "FL_WORKER_MEMORY_MIB", "> 0"),
    (["--slots-dir", " "], "FL_SLOTS_DIR", "non-empty path"),
    (["--worker-preload", "torchvison"], "FL_WORKER_PRELOAD", "no module named 'torchvison' in this Python environment"),
    (["--worker-preload", "torch vision"], "FL_WORKER_PRELOAD", "module names"),
]


@pytest.mark.parametrize("argv, env_name, allowed", [
    (["--identity-source", "mac"], "FL_IDENTITY_SOURCE", "hostname, container"),
    (["--worker-pool", "everywhere"], "FL_WORKER_POOL", "host, replica"),
    (["--worker-pool-wait", "0"], "FL_WORKER_POOL_WAIT", "must be a number > 0"),
])
def test_bad_client_setting_exits_2_naming_it(argv, env_name, allowed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        settings.parse(settings.ClientSettings, argv, {}, program="services.client")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and env_name in message and allowed in message


def test_a_bad_pool_lifetime_exits_2_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        settings.parse(settings.PoolSettings, ["--worker-pool-lifetime", "sometimes"], {}, program="services.pool")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "FL_WORKER_POOL_LIFETIME" in message and "askers, forever" in message


def parse_server(argv, environ=None):
    return settings.parse(settings.ServerSettings, argv, environ or {}, program="services.server", validate=validate)


@pytest.mark.parametrize("argv, env_name, allowed", BAD_SERVER_VALUES)
def test_bad_server_setting_exits_2_naming_it(argv, env_name, allowed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_server(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert env_name in message and allowed in message


def test_environment_variable_is_read_and_named_when_bad(capsys):
    assert parse_server([], {"FL_ROUNDS": "7"}).rounds == 7
    with pytest.raises(SystemExit):
        parse_server([], {"FL_DATASET": "imagenet"})
    message = capsys.readouterr().err
    assert "FL_DATASET" in message and "'imagenet'" in message and "from FL_DATASET" in message


def test_flag_overrides_environment():
    assert parse_server(["--rounds", "3"], {"FL_ROUNDS": "9"}).rounds == 3


def test_defaults_are_valid():
    values = parse_server([])
    assert (values.dataset, values.rounds, values.listen_address, values.client_eval) == ("digits", 5, "0.0.0.0:8080", False)


@pytest.mark.parametrize("good", ["0.0.0.0:8080", "server:8080", "[::]:8080", "127.0.0.1:1", "my-host.example:65535"])
def test_good_addresses(good):
    assert settings.address(good) == good


def test_client_bad_settings_exit_2(capsys):
    for argv, env_name in [(["--server-address", "server"], "FL_SERVER_ADDRESS"), (["--connect-timeout", "0"], "FL_CONNECT_TIMEOUT"), (["--client-id", "a b"], "FL_CLIENT_ID")]:
        with pytest.raises(SystemExit) as exit_info:
            settings.parse(settings.ClientSettings, argv, {}, program="services.client")
        assert exit_info.value.code == 2
        assert env_name in capsys.readouterr().err


def test_real_entry_point_exits_2_and_starts_nothing(tmp_path):
    """Through the real command: no results folder, no listening socket, one line on stderr."""
    results = tmp_path / "results"
    done = subprocess.run(
        [PYTHON, "-m", "services.server", "--rounds", "0", "--results-dir", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "FL_ROUNDS" in done.stderr and "'0'" in done.stderr
    assert not results.exists()


SETTINGS_PAGE = REPO / "docs" / "settings.md"  # where the generated table lives (the README links to it)


def test_every_setting_is_documented_in_docs_settings_md():
    page = SETTINGS_PAGE.read_text()
    names = {s.env for s in settings.SERVER + settings.CLIENT + settings.MONITOR
             + settings.LINK + settings.NODE + settings.SUBMIT}
    missing = sorted(name for name in names if f"`{name}`" not in page)
    assert not missing, f"docs/settings.md's settings table lacks {missing}"


def test_the_docs_settings_md_table_is_the_one_the_declarations_make():
    """docs/settings.md's table is generated (scripts/settings_table.py); a setting changed without
    regenerating it would document the old meaning, default or users."""
    table = subprocess.run([PYTHON, "scripts/settings_table.py"], cwd=REPO, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert table.strip() in SETTINGS_PAGE.read_text(), \
        "regenerate docs/settings.md's settings table: .venv/bin/python scripts/settings_table.py"
