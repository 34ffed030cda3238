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

With the host pool, a run's App is loaded once per host: the node names the App's FAB hash
(``warm_app``) and the pool forks the message's worker from a child that loaded it. Such a
worker skips Flower's install and load for that App; a message of another App first forgets
the warm App's modules (Flower's loader would otherwise reuse a module of the same name).
Flower's install itself is replaced by one that moves a complete folder into place in one
rename: many replicas' workers install the same App at once, and Flower's own install lets a
second one load a half-copied folder.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import flwr.supernode.runtime.run_clientapp as runtime
from flwr.common.config import get_metadata_from_config, get_project_config, get_project_dir
from flwr.common.constant import APP_DIR
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.utils import get_flwr_home
from flwr.supernode.cli import flwr_clientapp

from services.appmode.launch_args import without_parent_pid
from services.failures import is_out_of_memory

_flower_install = runtime.install_from_fab
_flower_loader = runtime.get_load_client_app_fn
_warm: dict[str, tuple[Path, Any]] = {}  # FAB hash -> (its installed folder, its loaded ClientApp): in a warm child and its workers


class _Watched:
    """The loaded ClientApp, noting the message type and the app's failure into ``seen``."""

    def __init__(self, app: Any, seen: dict[str, Any]) -> None:
        self.app = app
        self.seen = seen

    def __call__(self, message: Any, context: Any) -> Any:
        self.seen["message_type"] = message.metadata.message_type
        self.seen["message_id"] = message.metadata.message_id  # the ServerApp's reply checks name it (services.appmode.replies)
        self.seen["flwr_node_id"] = message.metadata.dst_node_id  # which replica Flower's node is (services.appmode.absences)
        try:
            reply = self.app(message=message, context=context)
        except BaseException as error:
            self.seen["app_error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
            self.seen["out_of_memory"] = is_out_of_memory(error)
            raise
        if reply.has_error():
            self.seen["app_error"] = f"error reply: {reply.error.reason}"
        return reply


def warm_app(fab_hash: str) -> None:
    """In the pool's warm child for a run (services.pool.warm): load the App with this FAB hash,
    installed by an earlier message's worker, once for every worker forked from here."""
    folders = sorted((get_flwr_home() / APP_DIR).glob(f"*.{fab_hash[:8]}"))
    for folder in folders:
        fab_id, version = get_metadata_from_config(get_project_config(folder))
        if get_project_dir(fab_id, version, fab_hash) == folder:
            app = _flower_loader(default_app_ref="", app_path=None, multi_app=True)(fab_id, version, fab_hash)
            _warm[fab_hash] = (folder, app)
            return
    raise LookupError(f"no App with FAB hash {fab_hash[:12]} is installed in {get_flwr_home()}")


def install_whole(fab: bytes, skip_prompt: bool = True) -> Path:
    """Flower's install of a FAB, made whole before anyone can see it: into a private folder,
    then renamed into FLWR_HOME (a second worker finds the complete folder or none)."""
    digest = hashlib.sha256(fab).hexdigest()
    if digest in _warm:
        return _warm[digest][0]
    apps = get_flwr_home() / APP_DIR
    apps.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".installing-", dir=apps.parent))
    try:
        staged = _flower_install(fab, install_dir=staging, skip_prompt=True)
        target = apps / staged.name
        try:
            os.rename(staged, target)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise  # (another worker put the same App there first: that one is whole)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _forget_warm_apps() -> None:
    """Before loading another App here: drop the warm App's modules and folder from this process."""
    folders = [str(folder) for folder, _ in _warm.values()]
    for name, module in list(sys.modules.items()):
        if (getattr(module, "__file__", None) or "").startswith(tuple(folder + os.sep for folder in folders)):
            del sys.modules[name]
    sys.path[:] = [entry for entry in sys.path if entry not in folders]
    _warm.clear()


def _watch_loaded_app(seen: dict[str, Any], replace: Callable[[], Any] | None = None) -> None:
    def get_load_client_app_fn(**kwargs: Any) -> Callable[..., Any]:
        load = _flower_loader(**kwargs)

        def load_watched(fab_id: str, fab_version: str, fab_hash: str) -> _Watched:
            started = time.perf_counter()
            seen["fab_hash"], seen["app_was_warm"] = fab_hash, fab_hash in _warm
            if replace is not None:
                app = replace()
            elif fab_hash in _warm:
                app = _warm[fab_hash][1]
            else:
                _forget_warm_apps()
                app = load(fab_id, fab_version, fab_hash)
            seen["app_load_seconds"] = round(time.perf_counter() - started, 4)
            return _Watched(app, seen)

        return load_watched

    runtime.get_load_client_app_fn = get_load_client_app_fn
    runtime.install_from_fab = install_whole


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
        "flwr_node_id": seen.get("flwr_node_id"),
        "app_error": seen.get("app_error"),
        "out_of_memory": seen.get("out_of_memory", False),
        "app_load_seconds": seen.get("app_load_seconds"),
        "fab_hash": seen.get("fab_hash"),
        "app_was_warm": seen.get("app_was_warm", False),
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


def run(argv: list[str], torch_threads: int) -> dict[str, Any]:
    """The worker job (``services.worker.run``; once it has started, Flower may have the message).
    SuperExec's ``--parent-pid`` is dropped: the worker dies with its asker or warm process
    instead, and in the host pool that pid is not SuperExec's (another pid namespace)."""
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    outcome = run_flower(without_parent_pid(argv))
    outcome["pid"], outcome["parent_pid"] = os.getpid(), os.getppid()
    return outcome
