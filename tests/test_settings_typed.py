"""The declaration mechanism: one typed, frozen object per program, composed from shared groups,
each setting declared once and reused with another default where a script needs one."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.bench import BenchSettings
from benchmarks.bench import parse as parse_bench
from services import settings
from services.launcher import LauncherSettings, torch_threads_per_worker
from services.launcher import parse as parse_launcher
from services.settings import ClientSettings, MonitorSettings, ServerSettings, TaskSettings


def test_each_program_gets_its_own_frozen_object():
    server = settings.parse(ServerSettings, ["--rounds", "3"], {})
    client = settings.parse(ClientSettings, [], {"FL_CLIENT_ID": "replica-1"})
    monitor = settings.parse(MonitorSettings, [], {})
    assert (type(server), type(client), type(monitor)) == (ServerSettings, ClientSettings, MonitorSettings)
    assert (server.rounds, client.client_id, monitor.monitor_interval) == (3, "replica-1", 0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        server.rounds = 4  # type: ignore[misc]


def test_a_program_lists_its_own_settings_first_then_its_groups_in_order():
    names = [s.name for s in settings.declared(ServerSettings)]
    task = [s.name for s in settings.declared(TaskSettings)]
    local = [s.name for s in settings.declared(settings.LocalSettings)]
    joins = [s.name for s in settings.declared(settings.JoinSettings)]
    assert names[: names.index("task")] == ["listen_address", "rounds", "min_clients", "join_grace", "join_timeout", "fraction_fit",
                                            "min_fit_clients", "client_eval", "strategy", "strategy_args", "results_dir", "run_id",
                                            "max_update_norm", "resume",
                                            "mlflow_experiment", "mlflow_optional", "tensorboard", "server_metrics_port", "tracking_flush_timeout",
                                            "mode"]  # EngineSettings, the first group
    assert names[names.index("task") :] == task + local + joins
    assert len(names) == len(set(names))


def test_a_bare_boolean_flag_means_true_and_a_value_is_still_checked(capsys):
    assert settings.parse(ServerSettings, ["--client-eval"], {}).client_eval is True
    assert settings.parse(ServerSettings, ["--client-eval", "off"], {}).client_eval is False
    with pytest.raises(SystemExit) as exit_info:
        settings.parse(ServerSettings, ["--client-eval", "maybe"], {})
    assert exit_info.value.code == 2 and "FL_CLIENT_EVAL" in capsys.readouterr().err


def test_values_as_flags_give_another_program_the_same_values():
    server = settings.parse(ServerSettings, ["--strategy", "fedprox", "--strategy-args", "proximal_mu=0.1", "--run-id", "r1", "--client-eval"], {})
    again = settings.parse(ServerSettings, settings.as_flags(server), {})
    assert again == server


def test_scripts_read_no_environment_variables_and_reuse_the_services_parsers(capsys):
    """bench.py's --rounds is ServerSettings' (same parser and help) with bench's own default; an
    FL_ROUNDS meant for the server does not reach it."""
    monkey_env = {"FL_ROUNDS": "9", "FL_LOCAL_EPOCHS": "7"}
    options = settings.parse(BenchSettings, [], monkey_env)
    assert (options.rounds, options.local_epochs, options.batch_size) == (4, 1, 32)
    by_name = {s.name: s for s in settings.declared(BenchSettings)}
    server = {s.name: s for s in settings.SERVER}
    assert by_name["rounds"].parse is server["rounds"].parse and by_name["rounds"].help == server["rounds"].help
    assert by_name["learning_rate"].default == server["learning_rate"].default
    with pytest.raises(SystemExit) as exit_info:
        parse_bench(["--local-epochs", "0"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message == "bench.py: error: --local-epochs = '0': must be an integer >= 1"


def test_bench_quick_changes_only_the_plan_defaults():
    quick, full = parse_bench(["--quick"]), parse_bench([])
    assert (quick.datasets, quick.clients, quick.rounds) == (["digits"], [2], 2)
    assert (full.datasets, full.clients, full.rounds) == (["synthetic", "digits"], [2, 5, 10, 20], 4)
    assert parse_bench(["--quick", "--rounds", "3"]).rounds == 3
    assert dataclasses.replace(quick, quick=False, datasets=full.datasets, clients=full.clients, rounds=full.rounds) == full


def test_the_launchers_defaults_follow_its_client_count(tmp_path):
    values = parse_launcher(["--clients", "3", "--results-dir", str(tmp_path)])
    assert isinstance(values, LauncherSettings)
    assert (values.min_clients, values.min_fit_clients, values.join_grace) == (3, 2, 0.0)
    assert values.torch_threads == torch_threads_per_worker(3)
    explicit = parse_launcher(["--clients", "3", "--min-clients", "2", "--torch-threads", "0", "--results-dir", str(tmp_path)])
    assert (explicit.min_clients, explicit.torch_threads) == (2, 0)


def test_defaults_for_a_setting_a_program_does_not_have_are_refused():
    with pytest.raises(KeyError, match="no setting"):
        settings.declared(ClientSettings, {"rounds": 3})
