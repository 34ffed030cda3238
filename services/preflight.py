"""``python -m services.preflight``: check every service's settings before any of them starts.

Compose runs this once, as the ``check`` service that the server, the client replicas and the
memory sidecar wait for (``service_completed_successfully``): a bad value stops ``up`` with the
line naming the setting, instead of an "unhealthy" server, a sidecar left running or replicas
restarting in a loop. Each program's own parser does the checking, so the rules are declared
once (``services.settings``), and the task module is checked the way the server checks it; a program whose compose variable differs from the shared
environment (the client's FL_DEVICE comes from BOUQUET_CLIENT_DEVICE) gets it with ``--set``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from services import settings as settings_module
from services.client.__main__ import validate as validate_client
from services.server.__main__ import check_task, validate as validate_server
from services.server.central import CentralEvaluator
from services.appmode.link import validate as validate_link
from services.appmode.node import validate as validate_node
from services.appmode.submit import validate as validate_submission
from services.pool.use import check_setting as check_pool_setting
from services.settings import (
    ClientSettings, CommandLineOnly, EngineSettings, LinkSettings, MonitorSettings, NodeSettings, PoolSettings, ServerSettings, SubmitSettings, comma_list, choice, repeated,
    setting,
)
from services.taskspec import Placement, TaskSpec

PROGRAMS: dict[str, tuple[type, Callable[[Any], Any] | None]] = {
    "server": (ServerSettings, validate_server),
    "client": (ClientSettings, validate_client),
    "pool": (PoolSettings, check_pool_setting),
    "monitor": (MonitorSettings, None),
}
# FL_MODE=app: the same services run app mode's programs (the server the link, a replica a
# node), and the one-shot submit runs the Flower App in the task folder.
APP_PROGRAMS: dict[str, tuple[type, Callable[[Any], Any] | None]] = {
    "server": (LinkSettings, validate_link),
    "client": (NodeSettings, validate_node),
    "pool": (PoolSettings, check_pool_setting),
    "monitor": (MonitorSettings, None),
    "submit": (SubmitSettings, validate_submission),
}


def override(raw: str) -> tuple[str, str, str]:
    """'client:FL_DEVICE=cuda' -> ('client', 'FL_DEVICE', 'cuda')."""
    program, _, assignment = raw.partition(":")
    key, equals, value = assignment.partition("=")
    if program not in PROGRAMS or not equals or not key.startswith("FL_"):
        raise ValueError(f"must be PROGRAM:FL_NAME=VALUE with PROGRAM one of {', '.join(PROGRAMS)}")
    return program, key, value


@dataclass(frozen=True, kw_only=True)
class PreflightSettings(CommandLineOnly):
    set: list[tuple[str, str, str]] = repeated(override, [], "a value one program sees instead of the environment's, as PROGRAM:FL_NAME=VALUE (may be repeated)")
    programs: list[str] = setting(comma_list(choice(*PROGRAMS), ", ".join(PROGRAMS)), list(PROGRAMS), "which programs to check")


def task_usable(values: ServerSettings) -> bool:
    """FL_TASK imported and checked in a worker, as the server does at start (torch stays out of
    this process too); a bad task is named before any replica starts."""
    evaluator = CentralEvaluator(TaskSpec.from_settings(values), Placement(values.data_dir, "cpu"), "spawn")
    try:
        check_task(values, evaluator)
    except (settings_module.SettingError, RuntimeError) as problem:
        print(f"services.server: error: {problem}", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    options = settings_module.parse(PreflightSettings, argv, program="services.preflight", description=__doc__)
    failed = []
    app_mode = settings_module.peek(EngineSettings, "mode", [], program="services.preflight") == "app"
    programs = APP_PROGRAMS if app_mode else PROGRAMS
    for program in [*options.programs, *(["submit"] if app_mode else [])]:
        declared, validate = programs[program]
        extra = {key: value for name, key, value in options.set if name == program}
        try:
            values = settings_module.parse(declared, [], environ={**os.environ, **extra}, program=f"services.{program}", validate=validate)
        except SystemExit as bad:  # parse printed the line naming the setting
            if bad.code != 0:
                failed.append(program)
            continue
        if isinstance(values, ServerSettings) and not task_usable(values):
            failed.append(program)
    if failed:
        print(f"services.preflight: bad settings for {', '.join(failed)}; nothing was started. Fix them in .env or your shell.", file=sys.stderr)
        return settings_module.EXIT_BAD_SETTING
    print(f"services.preflight: settings of {', '.join(options.programs)}{' (app mode) and submit' if app_mode else ''} are valid", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
