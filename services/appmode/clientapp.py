"""The job a ClientApp message's worker runs: Flower's own ``flwr-clientapp`` runtime, unchanged.

The node agent's warm forkserver forks the worker (flwr's ClientApp runtime and torch already
imported, CUDA untouched); ``services.worker`` admits it to a slot; then this calls flwr's
``flwr_clientapp()`` with the argv SuperExec gave Bouquet's launcher. Flower's runtime pulls the
message, loads and runs the app, pushes the reply and exits with its own code, which is
returned here (Flower ends with SystemExit).

To record what the message was and whether the app failed, the app that Flower loads is
wrapped (``get_load_client_app_fn`` of flwr 1.42's runtime module, replaced in this process
only): the app still receives the message and context Flower gives it and its reply or
exception goes back to Flower as before. Also recorded: how long loading the app took and the
installed packages it imported that the warm process had not (each message pays for those;
FL_WORKER_PRELOAD moves them into the warm process).
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
import time
from typing import Any, Callable

import flwr.supernode.runtime.run_clientapp as runtime
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.cli import flwr_clientapp

from services.failures import is_out_of_memory


class _Watched:
    """The loaded ClientApp, noting the message type and the app's failure into ``seen``."""

    def __init__(self, app: Any, seen: dict[str, Any]) -> None:
        self.app = app
        self.seen = seen

    def __call__(self, message: Any, context: Any) -> Any:
        self.seen["message_type"] = message.metadata.message_type
        self.seen["message_id"] = message.metadata.message_id  # the ServerApp's reply checks name it (services.appmode.replies)
        try:
            reply = self.app(message=message, context=context)
        except BaseException as error:
            self.seen["app_error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
            self.seen["out_of_memory"] = is_out_of_memory(error)
            raise
        if reply.has_error():
            self.seen["app_error"] = f"error reply: {reply.error.reason}"
        return reply


def _watch_loaded_app(seen: dict[str, Any], replace: Callable[[], Any] | None = None) -> None:
    original = runtime.get_load_client_app_fn

    def get_load_client_app_fn(**kwargs: Any) -> Callable[..., Any]:
        load = original(**kwargs)

        def load_watched(*args: Any) -> _Watched:
            started = time.perf_counter()
            app = replace() if replace is not None else load(*args)
            seen["app_load_seconds"] = round(time.perf_counter() - started, 4)
            return _Watched(app, seen)

        return load_watched

    runtime.get_load_client_app_fn = get_load_client_app_fn


def run_flower(argv: list[str], replace: Callable[[], Any] | None = None) -> dict[str, Any]:
    """flwr's ``flwr_clientapp()`` with ``argv``; what the message was and how it ended."""
    seen: dict[str, Any] = {}
    _watch_loaded_app(seen, replace)
    warm = set(sys.modules)
    sys.argv = ["flwr-clientapp", *argv]
    try:
        flwr_clientapp()
        code = 0
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
    return {
        "exit_code": code,
        "flwr_run_id": TaskIdentity.run_id,
        "task_id": TaskIdentity.task_id,
        "message_type": seen.get("message_type"),
        "message_id": seen.get("message_id"),
        "app_error": seen.get("app_error"),
        "out_of_memory": seen.get("out_of_memory", False),
        "app_load_seconds": seen.get("app_load_seconds"),
        **imported_after_fork(set(sys.modules), warm),
    }


def imported_after_fork(now: set[str], warm: set[str]) -> dict[str, list[str]]:
    """The installed packages (site-packages: not the app's own modules, not the standard library)
    that the message imported and the warm process had not, and those of them that the app's own
    modules import by name (what FL_WORKER_PRELOAD should list; the rest come with them)."""
    paths = sysconfig.get_paths()
    site = tuple(paths[key] + os.sep for key in ("purelib", "platlib"))
    standard = tuple(paths[key] + os.sep for key in ("stdlib", "platstdlib"))
    tops = {name.partition(".")[0] for name in now} - {name.partition(".")[0] for name in warm}
    installed = sorted(top for top in tops if not top.startswith("_") and _file(top).startswith(site))
    new_files = (_file(name) for name in now - warm)
    own = [file for file in new_files if file.endswith(".py") and not file.startswith(site + standard)]
    return {"imported_after_fork": installed, "app_imports_after_fork": sorted(_imported_names(own) & set(installed))}


def _file(module: str) -> str:
    return getattr(sys.modules.get(module), "__file__", None) or ""


def _imported_names(files: list[str]) -> set[str]:
    """Top-level package names the ``import`` statements of these source files name."""
    names: set[str] = set()
    for file in files:
        try:
            tree = ast.parse(open(file, encoding="utf-8").read())
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return names


def run(argv: list[str], torch_threads: int, reached_flower: str) -> dict[str, Any]:
    """The worker job (``services.worker.run``): ``reached_flower`` is created just before Flower
    takes the token, so the node knows whether a failure left the message to Flower or to it."""
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    with open(reached_flower, "w"):
        pass
    outcome = run_flower(argv)
    outcome["pid"], outcome["parent_pid"] = os.getpid(), os.getppid()
    return outcome
