"""No import runs back up a layer: every ``services`` module imports only modules of its own layer
or below (read from the source with ``ast``, lazy imports inside functions included), the three
roles (server, client, monitor) never import one another, and no two modules import each other
in a cycle. A new module must be given a layer here, which is the point: its place is decided."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# Lowest first. A module belongs to the first prefix it starts with, longest prefix winning.
LAYERS: list[tuple[str, ...]] = [
    ("services", "services.net", "services.files", "services.locks", "services.logs", "services.protocol", "services.failures", "services.lifetime", "services.misses", "services.heap"),
    ("services.settings", "services.roster", "services.cache"),
    ("services.tls", "services.certs", "services.joining", "services.taskspec", "services.budget", "services.models", "services.data", "services.partitioning",
     "services.updates"),  # the checks on a client's update, shared by task mode's server and app mode's ServerApp
    ("services.task", "services.builtin_task"),
    ("services.pool.wire",),  # what the host worker pool and its askers say (the worker speaks it)
    ("services.worker",),
    ("services.admission",),
    ("services.pool",),  # the host worker pool: forks workers (services.worker) for every replica
    ("services.tracking",),  # the trackers: fed from the run folder; the server and the monitor use them
    ("services.server", "services.client", "services.monitor"),
    # App mode settles with the server's membership and names its nodes as the client does.
    ("services.appmode",),
    # The programs: the server's and client's commands hand over to app mode's when FL_MODE=app;
    # the pool's preloads what app mode's message workers run.
    ("services.server.__main__", "services.client.__main__", "services.pool.__main__", "services.launcher", "services.preflight"),
]
ROLES = ("services.server", "services.client", "services.monitor")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((REPO / "services").rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The services modules ``path`` imports anywhere in it (``from package import submodule`` counts as the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("services"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("services"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    return found


def owner(module: str, prefixes: tuple[str, ...]) -> str | None:
    matches = [p for p in prefixes if module == p or module.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def layer_of(module: str) -> int:
    every = tuple(prefix for layer in LAYERS for prefix in layer)
    prefix = owner(module, every)
    assert prefix is not None, f"{module} has no layer in tests/test_layers.py: give it one"
    return next(index for index, layer in enumerate(LAYERS) if prefix in layer)


def edges() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: {other for other in imported(path, known) if other != name} for name, path in modules.items()}


def test_every_import_goes_down_or_stays_on_its_layer():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {other} (layer {layer_of(other)})"
        for module, others in edges().items() for other in sorted(others)
        if layer_of(other) > layer_of(module)
    ]
    assert upward == []


def test_the_server_client_and_monitor_never_import_one_another():
    crossing = [
        f"{module} imports {other}"
        for module, others in edges().items() for other in sorted(others)
        if owner(module, ROLES) and owner(other, ROLES) and owner(module, ROLES) != owner(other, ROLES)
    ]
    assert crossing == []


def test_no_two_modules_import_each_other_through_a_cycle():
    # a module importing its own package's __init__ is not a cycle
    graph = {module: {o for o in others if not module.startswith(o + ".")} for module, others in edges().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                cycles.append(" -> ".join(path[path.index(other):] + [other]) if other in path else f"{module} -> {other}")
            elif other not in state:
                visit(other, path + [other])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The parser must find imports in functions and submodules named in from-imports, or the tests above pass on nothing."""
    probe = tmp_path / "probe.py"
    probe.write_text("def late():\n    from services.admission import gate\n    import services.server.flower\n")
    assert imported(probe, {"services.admission.gate", "services.server.flower"}) == {"services.admission.gate", "services.server.flower"}
    assert layer_of("services.worker") < layer_of("services.admission.gate") < layer_of("services.server.flower")
