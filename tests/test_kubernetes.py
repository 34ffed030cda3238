"""deploy/kubernetes/: the kustomize overlays render with the pinned kubectl and validate against
the Kubernetes 1.37 JSON schemas (strict); their settings are the programs' own; and the rendered
pods' own specs RUN: a federation of the rendered server pod and 3 client pods under Docker, as a
kubelet would start them (tests/kube.py), completes 2 rounds.

No cluster is reachable here. The manifest tests skip when the pinned tools are missing (`bash
.ci/k8s-tools.sh` installs them), unless BOUQUET_REQUIRE_K8S_TOOLS=1; the pod run (marked
``docker``) also skips without Docker or the cpu images, unless BOUQUET_REQUIRE_DOCKER=1. CI sets
both, so there they fail instead.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

import kube
from services import joining, settings

OVERLAYS = ("cpu", "gpu")
PROGRAM_SETTINGS = {
    "server-settings": settings.SERVER,
    "client-settings": settings.CLIENT,
    "monitor-settings": settings.MONITOR,
}
CONTAINER_PROGRAM = {"server": settings.SERVER, "client": settings.CLIENT, "monitor": settings.MONITOR}


def _unavailable(reason: str, switch: str) -> None:
    if os.environ.get(switch) == "1":
        pytest.fail(f"{switch}=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def tools() -> None:
    reason = kube.missing_tools()
    if reason:
        _unavailable(reason, "BOUQUET_REQUIRE_K8S_TOOLS")


@pytest.fixture(scope="module")
def rendered(tools) -> dict[str, list[dict]]:
    return {name: kube.kustomize(kube.KUSTOMIZE_ROOT / "overlays" / name) for name in OVERLAYS}


# --- render and validate ------------------------------------------------------------------------


@pytest.mark.parametrize("resources, components", [
    (("overlays/cpu",), ()),
    (("overlays/gpu",), ()),
    (("overlays/gpu",), ("components/tls",)),
    (("overlays/cpu",), ("components/tls",)),
])
def test_overlays_render_and_pass_the_kubernetes_schemas(tools, tmp_path: Path, resources, components) -> None:
    documents = kube.kustomize(kube.overlay(tmp_path / "overlay", *resources, components=components) if components else kube.KUSTOMIZE_ROOT / resources[0])
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(documents))
    result = kube.validate(out)
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in documents}
    assert {("Job", "server"), ("Service", "server"), ("StatefulSet", "client"), ("PersistentVolumeClaim", "bouquet-data")} <= kinds


def test_the_time_slicing_config_passes_the_schemas(tools) -> None:
    result = kube.validate(kube.KUSTOMIZE_ROOT / "gpu-sharing" / "time-slicing-config.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_rejects_a_misspelt_field(rendered, tmp_path: Path) -> None:
    """What makes the schema check worth having: a typo in a manifest fails it."""
    documents = [dict(doc) for doc in rendered["cpu"]]
    client = kube.find(documents, "StatefulSet", "client")
    client["spec"] = {**client["spec"], "podManagmentPolicy": client["spec"]["podManagementPolicy"]}
    out = tmp_path / "typo.yaml"
    out.write_text(yaml.safe_dump_all(documents))
    result = kube.validate(out)
    assert result.returncode != 0 and "podManagmentPolicy" in result.stdout + result.stderr


# --- what the manifests promise -----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_the_programs_own_and_valid(rendered, overlay: str) -> None:
    """A misspelt FL_* name would be passed and silently ignored; a bad value would fail in a pod."""
    documents = rendered[overlay]
    for prefix, declared in PROGRAM_SETTINGS.items():
        if prefix == "monitor-settings" and overlay == "cpu":
            continue
        by_env = {setting.env: setting for setting in declared}
        data = kube.by_prefix(documents, "ConfigMap", prefix)["data"]
        assert set(data) <= set(by_env), f"{prefix}: {sorted(set(data) - set(by_env))} are not settings of that program"
        for key, value in data.items():
            by_env[key].parse(value)
    for doc in documents:
        if doc["kind"] in ("Job", "StatefulSet", "DaemonSet"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                known = {setting.env for setting in CONTAINER_PROGRAM[container["name"]]}
                names = {item["name"] for item in container.get("env", []) if item["name"].startswith("FL_")}
                assert names <= known, f"{doc['kind']}/{doc['metadata']['name']}: {sorted(names - known)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_with_requests_and_the_compose_readiness_check(rendered, overlay: str) -> None:
    documents = rendered[overlay]
    compose = yaml.safe_load((kube.REPO / "docker-compose.yml").read_text())["services"]
    server = kube.find(documents, "Job", "server")["spec"]["template"]["spec"]
    client_set = kube.find(documents, "StatefulSet", "client")
    assert client_set["spec"]["podManagementPolicy"] == "Parallel"
    client = client_set["spec"]["template"]["spec"]
    for pod in (server, client):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["shareProcessNamespace"] is True  # compose's init: true
        container = pod["containers"][0]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert container["image"].endswith(f":{overlay}")
    probe = server["containers"][0]["readinessProbe"]["exec"]["command"]
    assert probe == compose["server"]["healthcheck"]["test"][1:]
    assert not any("FL_CLIENT_ID" == item["name"] for item in client["containers"][0]["env"]), "pods identify by their name"


def test_gpu_overlay_gives_each_client_pod_one_gpu_and_a_monitor_per_node_without_a_runtime_socket(rendered) -> None:
    documents = rendered["gpu"]
    client = kube.find(documents, "StatefulSet", "client")["spec"]["template"]["spec"]["containers"][0]
    assert client["resources"]["limits"]["nvidia.com/gpu"] == 1
    monitor = kube.find(documents, "DaemonSet", "gpu-monitor")["spec"]["template"]["spec"]
    assert monitor["hostPID"] is True
    assert not any("hostPath" in volume for volume in monitor["volumes"]), "no container runtime socket, no host folders"
    assert monitor["containers"][0]["command"] == ["python", "-m", "services.monitor"]
    results = kube.find(documents, "PersistentVolumeClaim", "bouquet-results")
    assert results["spec"]["accessModes"] == ["ReadWriteMany"], "the monitor pods write into the run folders"
    assert not any(doc["kind"] == "DaemonSet" for doc in rendered["cpu"])


# --- the rendered pods, run -----------------------------------------------------------------------

CPU_IMAGES = ("bouquet/server:cpu", "bouquet/client:cpu")
PODS = 3


def _docker_client():
    reason = kube.docker_ready()
    if reason:
        _unavailable(reason, "BOUQUET_REQUIRE_DOCKER")
    import docker

    client = docker.from_env(timeout=120)
    missing = [image for image in CPU_IMAGES if not client.images.list(name=image)]
    if missing:
        _unavailable(f"images {missing} are missing: run scripts/build_images_offline.sh", "BOUQUET_REQUIRE_DOCKER")
    return client


def _read(container, path: str) -> str:
    """A file from a (stopped) container's volume, as `docker cp` reads it."""
    stream, _ = container.get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
        member = archive.getmembers()[0]
        return archive.extractfile(member).read().decode()


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_rendered_pods_run_a_three_pod_federation_under_docker(tools, tmp_path: Path) -> None:
    """The cpu overlay, with a user's overlay for a short run on top, exactly as rendered: the
    server Job's pod and the client StatefulSet's pods client-0..2, started as a kubelet would."""
    docker_client = _docker_client()
    user = {"configMapGenerator": [{"name": "server-settings", "behavior": "merge",
                                    "literals": ["FL_ROUNDS=2", "FL_RUN_ID=k8s", "FL_LOCAL_EPOCHS=1"]}]}
    documents = kube.kustomize(kube.overlay(tmp_path, "overlays/cpu", extra=user))
    server_template = kube.find(documents, "Job", "server")["spec"]["template"]
    clients = kube.find(documents, "StatefulSet", "client")
    assert clients["spec"]["replicas"] == PODS
    pods = [kube.Pod("server-x7k2p", server_template, documents)]  # a Job pod's name: <job>-<random>
    pods += [kube.Pod(f"client-{index}", clients["spec"]["template"], documents) for index in range(PODS)]
    assert pods[0].aliases() == ["server"] and all(pod.aliases() == [] for pod in pods[1:])

    # The Secret a user creates per deployment (docs/kubernetes.md), as the kubelet would mount it.
    token = joining.new_token()
    join_volume = next(v for v in server_template["spec"]["volumes"] if v["name"] == "join-token")["secret"]
    secrets = {"bouquet-join-token": kube.secret_folder(tmp_path / "join-token", join_volume, {"token": token},
                                                        server_template["spec"]["securityContext"]["fsGroup"])}
    project = f"bouquet-k8s-{uuid.uuid4().hex[:8]}"
    claims = {doc["metadata"]["name"]: f"{project}-{doc['metadata']['name']}" for doc in documents if doc["kind"] == "PersistentVolumeClaim"}
    network = docker_client.networks.create(project, driver="bridge", labels={"bouquet-test": project})
    containers = []
    try:
        for volume in claims.values():
            docker_client.volumes.create(volume, labels={"bouquet-test": project})
        for pod in pods:  # all at once, in no particular order, as the scheduler would
            options = pod.run_options(claims, project, project, secrets)
            network_aliases = pod.aliases()
            container = docker_client.containers.create(**{k: v for k, v in options.items() if k != "detach"})
            if network_aliases:
                network.disconnect(container)
                network.connect(container, aliases=network_aliases)
            container.start()
            containers.append(container)
        server = containers[0]
        probe = server_template["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]

        def logs() -> str:
            return "\n".join(f"--- {c.name}\n{c.logs(tail=40).decode(errors='replace')}" for c in containers)

        deadline, ready = time.monotonic() + 600, False
        while True:
            server.reload()
            if server.status == "exited":
                break
            if not ready:
                ready = server.exec_run(probe).exit_code == 0
            for client in containers[1:]:  # a kubelet would restart it; here it is the manifest's fault
                client.reload()
                assert client.status != "exited" or client.attrs["State"]["ExitCode"] == 0, f"{client.name} exited\n{logs()}"
            assert time.monotonic() < deadline, f"server pod still {server.status} after 600 s\n{logs()}"
            time.sleep(1)
        exit_code = server.wait(timeout=10)["StatusCode"]
        assert exit_code == 0, f"server pod exited {exit_code}\n{logs()}"
        assert ready, f"the readiness probe never passed while the server ran\n{logs()}"

        summary = json.loads(_read(server, "/results/k8s/summary.json"))
        rounds = [json.loads(line) for line in _read(server, "/results/k8s/metrics.jsonl").splitlines() if line.strip()]
        context = f"\n{json.dumps(summary.get('settled'))}\n{logs()}"
        assert summary["status"] == "completed" and summary["rounds_completed"] == 2, context
        assert summary["num_partitions"] == PODS and "all 3 replicas that started have connected" in summary["settled"], context
        assert summary["partitions"].keys() == {f"client-{i}" for i in range(PODS)}, context
        assert sorted(summary["partitions"].values()) == list(range(PODS)), context
        for record in rounds:
            assert sorted(c["partition"] for c in record["clients"]) == list(range(PODS)), context
        assert summary["joins_refused"] == 0 and summary["settings"]["join_token"] == "(set)", context
        assert token not in logs() and all(token not in str(c.attrs["Config"]["Env"]) for c in containers)
        for client in containers[1:]:  # told the run is over, each exits 0
            assert client.wait(timeout=120)["StatusCode"] == 0, f"{client.name}\n{logs()}"
    finally:
        for container in containers:
            container.remove(force=True)
        network.remove()
        for volume in docker_client.volumes.list(filters={"name": project}):  # the claims' and the emptyDirs'
            volume.remove(force=True)
