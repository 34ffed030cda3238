"""Rendering deploy/kubernetes/ with the pinned kubectl, and running rendered pods under Docker.

No cluster can run on the test machines, so the pods' specs are run the way a kubelet would run
them: the image with the container's command/args (command replaces the image's entrypoint, args
its CMD), its env and envFrom resolved from the rendered ConfigMaps, the pod's name as hostname,
the Services that select the pod as network aliases on one network, each PersistentVolumeClaim as
a Docker volume shared by the pods that mount it, the pod's user and group (securityContext), and
its memory limit. ``shareProcessNamespace`` puts the pause process at PID 1 to reap orphans:
Docker's ``--init`` does that job here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
KUSTOMIZE_ROOT = REPO / "deploy" / "kubernetes"
KUBECTL_MINOR = "v1.37."


def tools_dir() -> Path:
    """Where .ci/k8s-tools.sh installs kubectl and kubernetes-validate (BOUQUET_K8S_TOOLS wins)."""
    if os.environ.get("BOUQUET_K8S_TOOLS"):
        return Path(os.environ["BOUQUET_K8S_TOOLS"])
    cache = Path(os.environ.get("BOUQUET_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bouquet")
    return cache / "k8s-tools" / "bin"


def missing_tools() -> str | None:
    """Why the pinned tools cannot be used, or None."""
    folder = tools_dir()
    kubectl, validate = folder / "kubectl", folder / "kubernetes-validate"
    if not (kubectl.exists() and validate.exists()):
        return f"kubectl / kubernetes-validate not in {folder}: run `bash .ci/k8s-tools.sh`"
    version = subprocess.run([str(kubectl), "version", "--client"], capture_output=True, text=True)
    if KUBECTL_MINOR not in version.stdout:
        return f"{kubectl} is not kubectl {KUBECTL_MINOR}x (the pin of .ci/k8s-tools.sh): {version.stdout.strip()}"
    return None


def kustomize(folder: Path) -> list[dict]:
    result = subprocess.run([str(tools_dir() / "kubectl"), "kustomize", str(folder)], capture_output=True, text=True)
    assert result.returncode == 0, f"kubectl kustomize {folder}: {result.stderr}"
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert documents, f"kubectl kustomize {folder} rendered nothing"
    return documents


def validate(path: Path) -> subprocess.CompletedProcess:
    """Strict: a field the schema does not know (a typo) fails too."""
    return subprocess.run([str(tools_dir() / "kubernetes-validate"), "--strict", "--quiet", str(path)], capture_output=True, text=True)


def overlay(tmp_path: Path, *resources: str, components: tuple[str, ...] = (), extra: dict | None = None) -> Path:
    """A user's overlay in ``tmp_path`` on top of folders of deploy/kubernetes/ (kustomize wants
    relative paths)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    up = Path(os.path.relpath(KUSTOMIZE_ROOT, tmp_path))
    spec = {"resources": [str(up / r) for r in resources], **({"components": [str(up / c) for c in components]} if components else {}), **(extra or {})}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def find(documents: list[dict], kind: str, name: str) -> dict:
    matches = [doc for doc in documents if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def by_prefix(documents: list[dict], kind: str, prefix: str) -> dict:
    """A generated object (ConfigMaps get a hash suffix) by the name its generator was given."""
    matches = [doc for doc in documents if doc["kind"] == kind and doc["metadata"]["name"].rsplit("-", 1)[0] == prefix]
    assert len(matches) == 1, f"{kind}/{prefix}-*: {len(matches)} rendered"
    return matches[0]


@dataclass
class Pod:
    """One pod of a rendered workload, as the kubelet would start it."""

    name: str
    template: dict  # the workload's spec.template
    documents: list[dict]
    labels: dict = field(init=False)

    def __post_init__(self) -> None:
        self.labels = self.template["metadata"]["labels"]

    @property
    def spec(self) -> dict:
        return self.template["spec"]

    def container(self) -> dict:
        containers = self.spec["containers"]
        assert len(containers) == 1, f"{self.name}: one container per pod expected"
        return containers[0]

    def environment(self) -> dict[str, str]:
        container, env = self.container(), {}
        for source in container.get("envFrom", []):
            env.update(self._config_map(source["configMapRef"]["name"]))
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
            else:
                reference = item["valueFrom"]
                if "fieldRef" in reference and reference["fieldRef"]["fieldPath"] == "metadata.name":
                    env[item["name"]] = self.name
                elif "configMapKeyRef" in reference:
                    key = reference["configMapKeyRef"]
                    env[item["name"]] = self._config_map(key["name"])[key["key"]]
                else:
                    raise AssertionError(f"{self.name}: env {item['name']} comes from {reference}, which this runner does not know")
        return env

    def _config_map(self, name: str) -> dict[str, str]:
        return {key: str(value) for key, value in find(self.documents, "ConfigMap", name).get("data", {}).items()}

    def aliases(self) -> list[str]:
        """Services whose selector matches this pod: their names resolve to it."""
        return [
            doc["metadata"]["name"] for doc in self.documents
            if doc["kind"] == "Service" and doc["spec"].get("clusterIP") != "None"
            and doc["spec"]["selector"].items() <= self.labels.items()
        ]

    def run_options(self, volume_names: dict[str, str], network: str, project: str, secret_folders: dict[str, str] | None = None) -> dict:
        """docker SDK ``containers.run`` keyword arguments (the image as rendered). A Secret
        volume is a host folder the caller filled (``secret_folder``), by secret name."""
        container = self.container()
        context = {**self.spec.get("securityContext", {}), **container.get("securityContext", {})}
        options: dict = {
            "image": container["image"],
            "name": f"{project}-{self.name}",
            "hostname": self.name,
            "environment": self.environment(),
            "detach": True,
            "network": network,
            "init": bool(self.spec.get("shareProcessNamespace")),
            "labels": {"bouquet-test": project},
        }
        if "command" in container:
            options["entrypoint"] = container["command"]
            options["command"] = container.get("args", [])
        elif "args" in container:
            options["command"] = container["args"]
        if "runAsUser" in context:
            options["user"] = f"{context['runAsUser']}:{context.get('runAsGroup', context['runAsUser'])}"
        if "fsGroup" in self.spec.get("securityContext", {}):
            options["group_add"] = [str(self.spec["securityContext"]["fsGroup"])]
        if context.get("allowPrivilegeEscalation") is False:
            options["security_opt"] = ["no-new-privileges"]
        capabilities = context.get("capabilities", {})
        if capabilities.get("drop"):
            options["cap_drop"] = capabilities["drop"]
        if capabilities.get("add"):
            options["cap_add"] = capabilities["add"]
        if context.get("readOnlyRootFilesystem"):
            options["read_only"] = True
        memory = container.get("resources", {}).get("limits", {}).get("memory")
        if memory:
            options["mem_limit"] = memory.replace("Gi", "g").replace("Mi", "m")
        volumes = {volume["name"]: volume for volume in self.spec.get("volumes", [])}
        mounts = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                source = volume_names[volume["persistentVolumeClaim"]["claimName"]]
            elif "emptyDir" in volume:
                source = f"{project}-{self.name}-{mount['name']}"
            elif "secret" in volume and volume["secret"]["secretName"] in (secret_folders or {}):
                source = secret_folders[volume["secret"]["secretName"]]
            else:
                raise AssertionError(f"{self.name}: volume {volume} is not a PVC, an emptyDir or a Secret given to the runner; it cannot start it")
            mounts[source] = {"bind": mount["mountPath"], "mode": "ro" if mount.get("readOnly") else "rw"}
        options["volumes"] = mounts
        return options


def secret_folder(folder: Path, secret: dict, data: dict[str, str], fs_group: int) -> str:
    """A Secret volume as the kubelet makes it: the items (all keys when none are listed) as
    files with the volume's defaultMode, group fsGroup."""
    folder.mkdir(parents=True)
    items = secret.get("items") or [{"key": key, "path": key} for key in data]
    for item in items:
        path = folder / item["path"]
        path.write_text(data[item["key"]])
        if os.geteuid() == 0:
            os.chown(path, 0, fs_group)
        path.chmod(item.get("mode", secret.get("defaultMode", 0o644)) if os.geteuid() == 0 else 0o444)
    folder.chmod(0o755)
    return str(folder)


def docker_ready() -> str | None:
    """Why Docker cannot run the pods here, or None."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        return "the Docker daemon is not reachable (start dockerd, e.g. `bash .ci/docker.sh start`)"
    return None
