"""``python -m services.server``: validate settings, open the run folder, serve all rounds.

Whatever ends the run (all rounds done, an error, Ctrl-C or SIGTERM), summary.json is
written with what was completed; metrics.jsonl and the checkpoints are already on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import TypeVar

from services import joining, logs, roster, tls, worker
from services import settings as settings_module
from services.admission import config as admission_config
from services.pool.use import PoolProblem, check_setting as check_pool_setting, start_workers
from services.server import resume
from services.server.central import CentralEvaluator
from services.server.membership import Membership
from services.server.registry import PartitionRegistry
from services.server.results import RoundRecorder, RunFolder, RunInUse, RunState, load_checkpoint, utc_now
from services.settings import ServerSettings
from services.tracking.prometheus import RoundGauges
from services.tracking.run import RunTracking
from services.taskspec import Placement, TaskSpec, check_model_fits

log = logging.getLogger("bouquet.server")


S = TypeVar("S", bound=ServerSettings)


def validate(values: S) -> S:
    """Checks across settings, before anything starts (the task module itself is checked in a
    worker by ``check_task``). Returns them with FL_STRATEGY_ARGS converted to the strategy's types."""
    from services.server import strategies  # imports flwr: only once the single values are fine

    if values.task == "builtin":
        check_model_fits(values.dataset, values.model)
    values = dataclasses.replace(values, strategy_args=strategies.parse_args(values.strategy, values.strategy_args))
    if values.tls_dir is not None:
        tls.server_files(values.tls_dir)
    check_pool_setting(values)
    values = dataclasses.replace(values, join_token=joining.token_of(values.join_token, values.join_token_file))
    if values.min_fit_clients > values.min_clients:
        raise settings_module.SettingError(
            f"--min-fit-clients / FL_MIN_FIT_CLIENTS = {values.min_fit_clients}: must not exceed "
            f"--min-clients / FL_MIN_CLIENTS = {values.min_clients}, or no round could ever start"
        )
    return values


def check_task(settings: ServerSettings, evaluator: CentralEvaluator) -> dict:
    """FL_TASK imported and checked once, in a worker (torch never enters this process). A task
    that cannot run, or FedProx with a train() that cannot take its proximal term, is a bad
    setting: exit 2 with the line naming it."""
    try:
        info = evaluator.inspect()
    except worker.WorkerFailed as failure:
        if failure.error_type != "TaskError":  # the worker itself failed (timeout, killed) or Bouquet's code did: not the task's fault
            raise RuntimeError(f"could not check the task (FL_TASK = {settings.task!r}) in a worker ({failure.kind}): {failure.cause}") from None
        raise settings_module.SettingError(f"--task / FL_TASK = {settings.task!r}: {failure.detail}") from None
    if settings.strategy == "fedprox" and not info["train_takes_proximal_mu"]:
        raise settings_module.SettingError(
            f"--strategy / FL_STRATEGY = 'fedprox': the task's train() (FL_TASK = {settings.task!r}) takes no proximal_mu "
            "argument, so FedProx's proximal term could not reach training; add `proximal_mu: float = 0.0` to it"
        )
    return info


def fingerprint(settings: ServerSettings, spec: TaskSpec) -> dict:
    """What must be equal for a run to be continued: the task (its settings and its file's hash)
    and the strategy. FL_ROUNDS is not part of it: it may be raised to train further."""
    task = {key: value for key, value in spec.to_config().items() if key != "worker_timeout"}
    return {**task, "strategy": settings.strategy, "strategy_args": settings.strategy_args}


def open_run(settings: ServerSettings, spec: TaskSpec) -> tuple[RunState, resume.Progress | None]:
    """The run folder: an unfinished run to continue (FL_RESUME=auto), or a new one."""
    wanted = fingerprint(settings, spec)
    resumed = resume.choose(Path(settings.results_dir), settings.run_id, wanted, settings.rounds) if settings.resume == "auto" else None
    if resumed is None:
        folder = RunFolder(settings.results_dir, settings.run_id)
        return RunState(folder, {"run_id": folder.run_id, "created_at": utc_now(), "fingerprint": wanted, "restarts": []}), None
    previous = resume.status_of(resumed.path) or "crashed (no summary.json)"
    folder = RunFolder.reopen(resumed.path)
    state = RunState(folder, resumed.state)
    restart = {"at": utc_now(), "from_round": resumed.last_round + 1, "previous_status": previous}
    state.update(restarts=[*state.data.get("restarts", []), restart])
    log.info(
        "resuming run %s (FL_RESUME=auto): %d round(s) recorded, continuing at round %d from %s",
        folder.run_id, resumed.last_round, resumed.last_round + 1, resumed.checkpoint.name if resumed.checkpoint else "the seeded initial model",
    )
    return state, resumed


def main(argv: list[str] | None = None) -> int:
    if settings_module.peek(ServerSettings, "mode", argv, program="services.server") == "app":  # FL_MODE=app: the same service runs the link
        from services.appmode import link

        return link.main(argv)
    settings = settings_module.parse(
        ServerSettings, argv, program="services.server", description=__doc__, validate=validate
    )
    logs.setup()
    spec = TaskSpec.from_settings(settings)
    placement = Placement.from_settings(settings)
    try:  # the host's worker pool (waited for, checked), or this process's own forkserver started now
        start_workers(settings, "server")
    except PoolProblem as problem:
        print(f"services.server: error: {problem}", file=sys.stderr)
        return problem.exit_code
    try:
        task = check_task(settings, CentralEvaluator(spec, placement, settings.worker_start))
    except settings_module.SettingError as problem:
        print(f"services.server: error: {problem}", file=sys.stderr)
        return settings_module.EXIT_BAD_SETTING
    except RuntimeError as problem:
        print(f"services.server: error: {problem}", file=sys.stderr)
        return 1
    spec = dataclasses.replace(spec, task_sha256=task["sha256"])
    if not task["central_evaluation"]:
        log.info("the task has no load_centralized_dataset(): no server-side evaluation; the clients evaluate on their validation data after every round")
    try:  # before the run folder exists: a port in use is a bad setting, and nothing is started
        gauges = RoundGauges(settings.server_metrics_port) if settings.server_metrics_port is not None else None
    except OSError as problem:
        print(f"services.server: error: --server-metrics-port / FL_SERVER_METRICS_PORT = {settings.server_metrics_port}: {problem}", file=sys.stderr)
        return settings_module.EXIT_BAD_SETTING
    try:
        state, resumed = open_run(settings, spec)
    except (FileExistsError, OSError, resume.NotResumable, RunInUse) as problem:
        print(f"services.server: error: {problem}", file=sys.stderr)
        return settings_module.EXIT_BAD_SETTING
    folder = state.folder
    log.info("run %s: results in %s", folder.run_id, folder.path)
    log.info("gRPC on %s with %s", settings.listen_address, f"TLS (certificates from {settings.tls_dir})" if settings.tls_dir else "no TLS (plaintext; FL_TLS_DIR unset)")
    if settings.join_token is None:
        log.warning("no join token (FL_JOIN_TOKEN / FL_JOIN_TOKEN_FILE unset): any client that reaches %s may join the run", settings.listen_address)
    else:
        log.info("clients must prove the join token to join (challenge-response; the token never travels)")

    recorder = RoundRecorder(folder, rounds=resumed.rounds if resumed else None, initial=state.data.get("initial"))
    tracking = RunTracking(
        folder.path, settings_module.as_dict(settings), task, gauges=gauges,
        mlflow_experiment=settings.mlflow_experiment, mlflow_optional=settings.mlflow_optional, tensorboard=settings.tensorboard, flush_timeout=settings.tracking_flush_timeout,
    )
    recorder.on_commit(tracking.round_recorded)
    registry = PartitionRegistry()
    saved = (state.data["num_partitions"], state.data["partitions"]) if state.data.get("num_partitions") else None
    membership = Membership(
        registry, settings.min_clients, settings.join_grace, settings.join_timeout,
        announced=lambda: roster.live(settings.data_dir), saved=saved,
    )
    evaluator = CentralEvaluator(spec, placement, settings.worker_start, admission=admission_config.worker_admission(settings))
    resume_from = load_checkpoint(resumed.checkpoint) if resumed and resumed.checkpoint else None
    started_at, started = utc_now(), time.monotonic()
    status, error = "failed", None
    try:
        from services.server import flower  # imported late: flwr is slow to import and validation comes first

        flower.run(settings, spec, state, recorder, evaluator, membership, central_evaluation=task["central_evaluation"], resume_from=resume_from)
        status = "completed" if len(recorder.trained_rounds) == settings.rounds else "incomplete"
    except KeyboardInterrupt:
        status, error = "interrupted", "KeyboardInterrupt"
    except SystemExit as exit_request:  # Flower's SIGINT/SIGTERM handler exits this way
        status, error = "interrupted", f"stopped by signal (exit {exit_request.code})"
    except Exception as problem:
        error = f"{type(problem).__name__}: {problem}"
        log.exception("run %s failed", folder.run_id)
    finally:
        last = recorder.rounds[-1] if recorder.rounds else {}
        folder.write_summary(
            {
                "run_id": folder.run_id,
                "status": status,
                "error": error,
                "rounds_requested": settings.rounds,
                "rounds_completed": len(recorder.trained_rounds),
                "rounds_recorded": len(recorder.rounds),
                "rounds_without_training": [r["round"] for r in recorder.rounds if not r["trained"]],
                "rounds_trained_by_partition": recorder.rounds_trained_by_partition(registry.num_partitions),
                "updates_rejected": recorder.updates_rejected,
                "updates_clipped": recorder.updates_clipped,
                "joins_refused": recorder.joins_refused,
                "rounds_missed_by_partition": recorder.rounds_missed_by_partition(),
                "partitions_by_host": recorder.partitions_by_host(),
                "initial_accuracy": recorder.initial.get("accuracy"),
                "initial_loss": recorder.initial.get("loss"),
                "final_accuracy": last.get("accuracy"),
                "final_loss": last.get("loss"),
                "num_partitions": registry.num_partitions,
                "settled": membership.how_settled,
                "task": {"reference": settings.task, "path": task["path"], "sha256": task["sha256"]},
                "strategy": {"name": settings.strategy, "args": settings.strategy_args},
                "central_evaluation": task["central_evaluation"],
                "client_eval": settings.client_eval or not task["central_evaluation"],
                "partitions": registry.assignments,
                "restarts": state.data["restarts"],
                "started_at": state.data["created_at"],
                "this_start_at": started_at,
                "ended_at": utc_now(),
                "duration_seconds": round(time.monotonic() - started, 3),
                "settings": settings_module.as_dict(settings),
            }
        )
    tracking.finish()
    log.info("run %s %s: %d of %d rounds trained; results in %s", folder.run_id, status, len(recorder.trained_rounds), settings.rounds, folder.path)
    return 0 if status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
