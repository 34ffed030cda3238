"""A task's extra pip packages reach the images, the offline way (docs/tasks.md).

The user lists them, pinned, in ``task/requirements.txt``; ``scripts/build_images_offline.sh``
downloads their wheels into the host's wheelhouse and both images install them in a layer of
their own. This test does exactly that with a package the images lack, in a copy of the project,
under a tag of its own (the images compose runs are not touched), on top of the cached
dependency layer of those images (no torch layer is rebuilt), then checks the task in a worker
of each image the way the server checks it at start (``python -m services.preflight``), which
imports the task module and so the package. The image without the layer fails the same check:
the package really came from the new layer. Marked ``docker``: it skips without Docker, unless
BOUQUET_REQUIRE_DOCKER=1 (CI), and needs the cpu images of scripts/build_images_offline.sh.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_compose import CPU_IMAGES, _unavailable

REPO = Path(__file__).resolve().parent.parent
# Tiny, pure Python, no dependencies, not in requirements.lock: only the task layer can bring it.
PACKAGE, VERSION = "termcolor", "2.4.0"

TASK = f'''"""A Flower-style task that needs a package Bouquet's images do not ship."""
import {PACKAGE}
import torch

Net = lambda: torch.nn.Linear(2, 2)


def load_data(partition_id, num_partitions, batch_size):
    raise NotImplementedError


def train(net, trainloader, epochs, lr, device):
    raise NotImplementedError


def test(net, testloader, device):
    raise NotImplementedError
'''


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def _image_id(image: str) -> str | None:
    found = _docker("image", "inspect", "--format", "{{.Id}}", image)
    return found.stdout.strip() if found.returncode == 0 else None


def _project_copy(target: Path) -> Path:
    """The project's files (tracked and new, not ignored) as the build context of the copy."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, text=True, check=True)
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def _shared_cache() -> Path:
    """The build script's cache (its default), whose wheelhouse the built images came from."""
    if os.environ.get("BOUQUET_CACHE_DIR"):
        return Path(os.environ["BOUQUET_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bouquet"


def _preflight(image: str, task_folder: Path) -> subprocess.CompletedProcess:
    return _docker(
        "run", "--rm", "--network", "none", "--volume", f"{task_folder}:/task:ro", "--env", "FL_TASK=/task/task.py",
        image, "python", "-m", "services.preflight", "--programs", "server",
        timeout=180,
    )


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_task_requirements_reach_the_workers_of_an_offline_build(tmp_path: Path) -> None:
    if shutil.which("docker") is None or _docker("info", timeout=20).returncode != 0:
        _unavailable("the Docker daemon is not reachable (start dockerd, e.g. `bash .ci/docker.sh start`)")
    shared = {image: _image_id(image) for image in CPU_IMAGES}
    if None in shared.values() or not (_shared_cache() / "wheelhouse").is_dir():
        _unavailable(f"images {list(CPU_IMAGES)} or their wheelhouse are missing: run scripts/build_images_offline.sh")

    project = _project_copy(tmp_path / "project")
    (project / "task").mkdir(exist_ok=True)
    (project / "task" / "requirements.txt").write_text(f"{PACKAGE}=={VERSION}\n")
    task_folder = tmp_path / "task"
    task_folder.mkdir(mode=0o755)
    (task_folder / "task.py").write_text(TASK)
    (task_folder / "task.py").chmod(0o644)
    # A cache of this test's own (logs, pin lists) around the shared wheelhouse: the task's wheel
    # is added to it as a user's would be.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "wheelhouse").symlink_to(_shared_cache() / "wheelhouse")
    tag = f"task-packages-test-{os.getpid()}"
    images = [f"bouquet/{program}:{tag}" for program in ("server", "client")]
    try:
        build = subprocess.run(
            ["bash", str(project / "scripts" / "build_images_offline.sh"), "--flavour", "cpu", "--tag", tag],
            env={**os.environ, "BOUQUET_CACHE_DIR": str(cache)},
            capture_output=True, text=True, timeout=780,
        )
        assert build.returncode == 0, f"offline build exited {build.returncode}:\n{build.stdout}{build.stderr}"
        assert f"packages beyond requirements.lock ({PACKAGE}=={VERSION})" in build.stdout
        assert (cache / "wheelhouse" / f"{PACKAGE}-{VERSION}-py3-none-any.whl").is_file()
        for log in ("build-server.log", "build-client.log"):
            text = (cache / log).read_text()
            assert re.search(r"RUN sh /tmp/deps/install-deps\.sh[^\n]*\n ---> Using cache", text), f"{log}: the dependency layer was rebuilt, not taken from the cache"
        # the server's build installed it; the client's took that layer (the shared prefix) as is
        assert f"Successfully installed {PACKAGE}-{VERSION}" in (cache / "build-server.log").read_text()

        for image in images:
            checked = _preflight(image, task_folder)
            assert checked.returncode == 0, f"{image}: {checked.stdout}{checked.stderr}"
            present = _docker("run", "--rm", "--network", "none", image, "python", "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)")
            assert present.stdout.startswith("/opt/venv/"), present.stdout + present.stderr
        without = _preflight(CPU_IMAGES[1], task_folder)
        assert without.returncode == 2, without.stdout + without.stderr
        assert "FL_TASK" in without.stderr and f"No module named '{PACKAGE}'" in without.stderr, without.stderr
    finally:
        _docker("image", "rm", *images)
    assert all(_image_id(image) is None for image in images)
    assert {image: _image_id(image) for image in CPU_IMAGES} == shared, "the images compose runs were changed"
