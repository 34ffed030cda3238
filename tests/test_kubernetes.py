"""deploy/kubernetes/: the kustomize overlays (task mode: cpu, gpu; app mode: app-cpu, app-gpu)
render with the pinned kubectl and validate against the Kubernetes 1.37 JSON schemas (strict); their
settings are the programs' own; app mode keeps Control off the clients' Service; and the rendered
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
import re
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

import kube
from services import joining, settings
from services.appmode import submit as submission

OVERLAYS = ("cpu", "gpu", "app-cpu", "app-gpu")
APP_OVERLAYS = ("app-cpu", "app-gpu")
# The program each container runs; FL_MODE=app: the server runs the link, a client pod a node
# (services.appmode), and the Job submit the submission.
PROGRAMS = {
    "task": {"server": settings.SERVER, "client": settings.CLIENT, "monitor": settings.MONITOR},
    "app": {"server": (*settings.SERVER, *settings.LINK), "client": (*settings.CLIENT, *settings.NODE),
            "monitor": settings.MONITOR, "submit": settings.SUBMIT},
}
CONFIG_MAP_READER = {"server-settings": "server", "client-settings": "client", "monitor-settings": "monitor", "submit-settings": "submit"}


def _mode(overlay: str) -> str:
    return "app" if overlay.startswith("app-") else "task"


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
    (("overlays/app-cpu",), ()),
    (("overlays/app-gpu",), ()),
    (("overlays/app-gpu",), ("components/tls",)),
])
def test_overlays_render_and_pass_the_kubernetes_schemas(tools, tmp_path: Path, resources, components) -> None:
    documents = kube.kustomize(kube.overlay(tmp_path / "overlay", *resources, components=components) if components else kube.KUSTOMIZE_ROOT / resources[0])
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(documents))
    result = kube.validate(out)
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in documents}
    assert {("Job", "server"), ("Service", "server"), ("StatefulSet", "client"), ("PersistentVolumeClaim", "bouquet-data")} <= kinds
    app = {("Job", "submit"), ("Service", "server-control"), ("NetworkPolicy", "server-control")}
    assert app <= kinds if "app-" in resources[0] else not app & kinds


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


def _templates(documents: list[dict]) -> dict[str, dict]:
    """The pod template of every workload, by the workload's name."""
    return {doc["metadata"]["name"]: doc["spec"]["template"] for doc in documents if doc["kind"] in ("Job", "StatefulSet", "DaemonSet")}


def _pods(documents: list[dict]) -> dict[str, kube.Pod]:
    """One pod of each Bouquet workload as the kubelet would start it (env resolved), by workload."""
    return {name: kube.Pod(f"{name}-0", template, documents) for name, template in _templates(documents).items()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_the_programs_own_and_valid(rendered, overlay: str) -> None:
    """A misspelt FL_* name would be passed and silently ignored; a bad value would fail in a pod."""
    documents, programs = rendered[overlay], PROGRAMS[_mode(overlay)]
    generated = {doc["metadata"]["name"].rsplit("-", 1)[0] for doc in documents if doc["kind"] == "ConfigMap"}
    assert generated == {"server-settings", "client-settings"} | ({"monitor-settings"} if "gpu" in overlay else set()) | ({"submit-settings"} if _mode(overlay) == "app" else set())
    for prefix in generated:
        by_env = {setting.env: setting for setting in programs[CONFIG_MAP_READER[prefix]]}
        data = kube.by_prefix(documents, "ConfigMap", prefix)["data"]
        assert set(data) <= set(by_env), f"{prefix}: {sorted(set(data) - set(by_env))} are not settings of that program"
        for key, value in data.items():
            by_env[key].parse(value)
    for name, template in _templates(documents).items():
        for container in template["spec"]["containers"]:
            by_env = {setting.env: setting for setting in programs[container["name"]]}
            names = {item["name"] for item in container.get("env", []) if item["name"].startswith("FL_")}
            assert names <= set(by_env), f"{name}: {sorted(names - set(by_env))}"
            for item in container.get("env", []):
                if item["name"] in by_env:
                    by_env[item["name"]].parse(str(item["value"]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_with_requests_and_the_compose_readiness_check(rendered, overlay: str) -> None:
    documents = rendered[overlay]
    compose = yaml.safe_load((kube.REPO / "docker-compose.yml").read_text())["services"]
    server = kube.find(documents, "Job", "server")["spec"]["template"]["spec"]
    client_set = kube.find(documents, "StatefulSet", "client")
    assert client_set["spec"]["podManagementPolicy"] == "Parallel"
    client = client_set["spec"]["template"]["spec"]
    bouquet = [template["spec"] for name, template in _templates(documents).items() if name != "gpu-monitor"]
    assert len(bouquet) == (3 if _mode(overlay) == "app" else 2)  # server, client (, submit)
    for pod in bouquet:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["shareProcessNamespace"] is True  # compose's init: true
        for container in (*pod["containers"], *pod.get("initContainers", [])):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert container["image"].endswith(f":{overlay.removeprefix('app-')}")
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


# --- app mode -------------------------------------------------------------------------------------


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _volumes(pod: kube.Pod) -> dict[str, dict]:
    return {volume["name"]: volume for volume in pod.spec.get("volumes", [])}


def _mounted_secret(pod: kube.Pod, file: str) -> tuple[str, str, bool]:
    """(Secret, key, read-only) of the Secret volume through which ``file`` is in the pod's container."""
    folder, _, name = file.rpartition("/")
    for mount in pod.container()["volumeMounts"]:
        secret = _volumes(pod)[mount["name"]].get("secret")
        if secret and folder == mount["mountPath"]:
            key = next(item["key"] for item in secret["items"] if item["path"] == name)
            return secret["secretName"], key, mount.get("readOnly", False)
    raise AssertionError(f"{pod.name}: {file} is in no Secret volume")


def _references(pod: kube.Pod) -> set[str]:
    """The Secrets and ConfigMaps the pod's volumes take."""
    return {volume.get("secret", {}).get("secretName") or volume.get("configMap", {}).get("name") for volume in _volumes(pod).values()} - {None}


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_app_mode_clients_reach_only_the_fleet_port_and_only_the_submit_job_reaches_control(rendered, overlay: str) -> None:
    documents = rendered[overlay]
    pods = _pods(documents)
    server, client, submit = pods["server"], pods["client"], pods["submit"]
    for pod in (server, client, submit):
        assert pod.environment()["FL_MODE"] == "app", pod.name
    fleet, control = _port(server.environment()["FL_LISTEN_ADDRESS"]), _port(server.environment()["FL_CONTROL_ADDRESS"])
    ports = {port["name"]: port["containerPort"] for port in server.container()["ports"]}
    assert ports == {"fleet": fleet, "control": control} and fleet != control
    assert not any("hostPort" in port for pod in pods.values() for port in pod.container().get("ports", [])), "no port on a node's address"
    # The Services that reach the server pod, and which of its ports: the SuperLink's own (on its loopback) is none.
    services = [doc for doc in documents if doc["kind"] == "Service"]
    assert all(doc["spec"].get("type", "ClusterIP") == "ClusterIP" for doc in services), "nothing exposed beyond the cluster here"
    reaching = {doc["metadata"]["name"]: {ports.get(port["targetPort"], port["targetPort"]) for port in doc["spec"]["ports"]}
                for doc in services if doc["spec"]["selector"].items() <= server.labels.items()}
    assert reaching == {"server": {fleet}, "server-control": {control}}
    assert client.environment()["FL_SERVER_ADDRESS"] == f"server:{fleet}"
    assert submit.environment()["FL_SERVER_ADDRESS"] == f"server-control:{control}"
    # Where the network plugin enforces it: Fleet from anyone, Control from the submit Job's pods only, nothing else.
    policy = kube.find(documents, "NetworkPolicy", "server-control")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= server.labels.items() and policy["policyTypes"] == ["Ingress"]

    def admits(pod: kube.Pod, port: int) -> bool:
        return any(port in {p["port"] for p in rule["ports"]}
                   and ("from" not in rule or any(peer["podSelector"]["matchLabels"].items() <= pod.labels.items() for peer in rule["from"]))
                   for rule in policy["ingress"])

    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {fleet, control}
    assert admits(client, fleet) and admits(submit, control)
    assert not admits(client, control) and not admits(server, control)


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_the_submit_job_runs_the_app_with_the_submit_token_that_no_client_pod_holds(rendered, overlay: str) -> None:
    documents = rendered[overlay]
    pods = _pods(documents)
    server, client, submit = pods["server"], pods["client"], pods["submit"]
    job = kube.find(documents, "Job", "submit")
    assert job["spec"]["backoffLimit"] == 0 and submit.spec["restartPolicy"] == "Never", "a retry would be a second run"
    assert submit.container()["args"] == ["python", "-m", "services.appmode.submit"]
    env = submit.environment()
    token = ("bouquet-submit-token", "token", True)
    assert _mounted_secret(submit, env["FL_SUBMIT_TOKEN_FILE"]) == token
    assert _mounted_secret(server, server.environment()["FL_SUBMIT_TOKEN_FILE"]) == token
    # The client pods run the ClientApp: no submit token; the join token does not apply in app mode.
    assert _references(client).isdisjoint({"bouquet-submit-token", "bouquet-join-token"})
    assert "bouquet-join-token" not in _references(server)
    assert "FL_JOIN_TOKEN_FILE" not in client.environment() | server.environment()
    assert not any("secretKeyRef" in item.get("valueFrom", {}) for pod in pods.values()
                   for container in (*pod.spec["containers"], *pod.spec.get("initContainers", [])) for item in container.get("env", []))
    # FL_APP is the folder the init container unpacks the ConfigMap bouquet-app's zip into.
    unpack = submit.spec["initContainers"][0]
    volumes = _volumes(submit)
    app_mount = next(m for m in submit.container()["volumeMounts"] if m["mountPath"] == env["FL_APP"])
    assert "emptyDir" in volumes[app_mount["name"]] and app_mount["readOnly"] is True
    zip_mount = next(m for m in unpack["volumeMounts"] if "configMap" in volumes[m["name"]])
    assert volumes[zip_mount["name"]]["configMap"]["name"] == "bouquet-app"
    assert unpack["args"][-2:] == [f"{zip_mount['mountPath']}/app.zip", env["FL_APP"]]
    assert {m["mountPath"]: m["name"] for m in unpack["volumeMounts"]}[env["FL_APP"]] == app_mount["name"]
    # The run folder: submit writes it, the server's ServerApp works in it: one volume, pods on any node.
    claims = {pod.name: {m["mountPath"]: _volumes(pod)[m["name"]]["persistentVolumeClaim"]["claimName"]
                         for m in pod.container()["volumeMounts"] if "persistentVolumeClaim" in _volumes(pod)[m["name"]]}
              for pod in (server, submit)}
    assert claims[server.name]["/results"] == claims[submit.name][env["FL_RESULTS_DIR"]] == "bouquet-results"
    assert claims[submit.name][env["FL_DATA_DIR"]] == "bouquet-data"
    assert kube.find(documents, "PersistentVolumeClaim", "bouquet-results")["spec"]["accessModes"] == ["ReadWriteMany"]
    # Workers as docs/kubernetes.md says ("Pods"): each client pod's own warm process, no per-node pool.
    assert client.environment()["FL_WORKER_POOL"] == "replica"
    assert not any("hostPath" in volume for pod in pods.values() for volume in pod.spec.get("volumes", []))


def test_the_tls_component_gives_the_submit_job_the_ca_only(tools, tmp_path: Path) -> None:
    documents = kube.kustomize(kube.overlay(tmp_path, "overlays/app-gpu", components=("components/tls",)))
    submit = _pods(documents)["submit"]
    folder = submit.environment()["FL_TLS_DIR"]
    mount = next(m for m in submit.container()["volumeMounts"] if m["mountPath"] == folder)
    secret = _volumes(submit)[mount["name"]]["secret"]
    assert secret["secretName"] == "bouquet-tls" and secret["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


def test_the_documented_zip_unpacked_as_the_init_container_does_is_an_app_the_submission_takes(rendered, tmp_path: Path) -> None:
    """docs/kubernetes.md's zip command, then the init container's own args (local paths for the
    pod's): FL_APP is then a Flower App folder, as services.appmode.submit checks it."""
    page = (kube.REPO / "docs" / "kubernetes.md").read_text()
    command = next(line for line in page.splitlines() if line.startswith("python3 -m zipfile -c app.zip "))
    subprocess.run(["bash", "-c", command.replace("app.zip", str(tmp_path / "app.zip"), 1)], cwd=kube.REPO, check=True)
    pod = _pods(rendered["app-cpu"])["submit"]
    app = pod.environment()["FL_APP"]
    unpack = pod.spec["initContainers"][0]
    mount = next(m for m in unpack["volumeMounts"] if "configMap" in _volumes(pod)[m["name"]])
    local = {f"{mount['mountPath']}/app.zip": str(tmp_path / "app.zip"), app: str(tmp_path / "task")}
    args = [sys.executable if arg == "python" else local.get(arg, arg) for arg in unpack["args"]]
    subprocess.run(args, check=True)
    assert submission.validate(settings.SubmitSettings(app=str(tmp_path / "task"))).app == str(tmp_path / "task")
    assert (tmp_path / "task" / "quickstart_app" / "client_app.py").is_file()


def test_docs_create_every_secret_and_config_map_the_overlays_mount_and_name_real_folders(rendered, tmp_path: Path) -> None:
    """docs/kubernetes.md is how a user gets the Secrets and the App's ConfigMap: a name that
    differs from the manifests' leaves the pods in ContainerCreating."""
    page = (kube.REPO / "docs" / "kubernetes.md").read_text()
    created = set(re.findall(r"kubectl create (?:secret generic|configmap) -n bouquet (\S+)", page))
    with_tls = kube.kustomize(kube.overlay(tmp_path, "overlays/app-gpu", components=("components/tls",)))
    needed = set()
    for documents in (*rendered.values(), with_tls):
        generated = {doc["metadata"]["name"] for doc in documents if doc["kind"] == "ConfigMap"}
        needed |= {name for pod in _pods(documents).values() for name in _references(pod)} - generated
    assert needed == created, f"mounted, never created: {sorted(needed - created)}; created, never mounted: {sorted(created - needed)}"
    for folder in re.findall(r"-k deploy/kubernetes/([\w/-]+)", page):
        assert (kube.KUSTOMIZE_ROOT / folder / "kustomization.yaml").is_file(), folder


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
