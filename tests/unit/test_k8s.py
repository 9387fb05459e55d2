"""deploy/k8s: every overlay renders with `kubectl kustomize`, every object passes kubernetes-validate --strict
(a non-core kind: a JSON schema kept in tests/data/k8s-schemas/), and the policies the deployment relies on
hold in the rendered objects: probes, ports, GPUs, the teacher's address, the drain, weights from the volume,
the configs. No cluster is needed (none can run here); kubectl (render only) is the machine's.
"""

from __future__ import annotations

import functools
import json
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

from asymkd.config import load_config
from student_trainer.config import TrainConfig
from teacher_server.config import ServeConfig

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
SCHEMAS = REPO / "tests" / "data" / "k8s-schemas"
OVERLAYS = ["base", "overlays/dev", "overlays/prod"]
K8S_VERSION = "1.37"  # the newest schemas kubernetes-validate 1.37.0 ships
GPU = "nvidia.com/gpu"
DRAIN_MARGIN_S = 15  # terminationGracePeriodSeconds = serve.yaml drain_timeout_s + this
TEACHER_SERVICE = "asymkd.v1.Teacher"


def kubectl() -> str:
    found = shutil.which("kubectl")
    assert found, "kubectl not found: rendering the overlays needs kubectl on PATH (`kubectl kustomize`)"
    return found


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    res = subprocess.run(
        [kubectl(), "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, f"kubectl kustomize {overlay}: {res.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(res.stdout) if doc)


def objects(overlay: str, kind: str) -> list[dict]:
    return [o for o in render(overlay) if o["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict:
    found = [o for o in objects(overlay, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: {kind}/{name}: {len(found)} found"
    return found[0]


def teacher(overlay: str) -> dict:
    return one(overlay, "Deployment", "asymkd-teacher")


def student(overlay: str) -> dict:
    return one(overlay, "Job", "asymkd-student")


def container(workload: dict, name: str, init: bool = False) -> dict:
    spec = workload["spec"]["template"]["spec"]
    return next(c for c in spec["initContainers" if init else "containers"] if c["name"] == name)


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def config_file(overlay: str, key: str, tmp_path: Path) -> Path:
    """A file of the ConfigMap the pods mount (its name has kustomize's content hash)."""
    volumes = teacher(overlay)["spec"]["template"]["spec"]["volumes"]
    name = next(v["configMap"]["name"] for v in volumes if "configMap" in v)
    path = tmp_path / f"{Path(overlay).name}-{key}"
    path.write_text(one(overlay, "ConfigMap", name)["data"][key])
    return path


def serve_config(overlay: str, tmp_path: Path) -> ServeConfig:
    args = container(teacher(overlay), "teacher")["args"]  # flags override the file, as on the pod
    config = args[args.index("--config") + 1]
    assert config == "/etc/asymkd/serve.yaml"
    rest = args[: args.index("--config")] + args[args.index("--config") + 2 :]
    return load_config(ServeConfig, config_file(overlay, "serve.yaml", tmp_path), rest)


def train_config(overlay: str, tmp_path: Path) -> TrainConfig:
    assert "--config /etc/asymkd/train.yaml" in student_command(overlay)
    return load_config(TrainConfig, config_file(overlay, "train.yaml", tmp_path))


def student_command(overlay: str) -> str:
    c = container(student(overlay), "student")
    assert c["command"] == ["bash", "-c"]
    return " ".join(c["args"])


def under_mount(path: str, c: dict, pod: dict) -> dict | None:
    """The persistentVolumeClaim volume that `path` lies on in container `c`, or None."""
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    for mount in c.get("volumeMounts", []):
        if PurePosixPath(path).is_relative_to(mount["mountPath"]) and mount["name"] in claims:
            return claims[mount["name"]]
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_the_same_objects(overlay):
    kinds = sorted((o["kind"], o["metadata"]["name"].split("-config-")[0]) for o in render(overlay))
    expected = [
        ("ConfigMap", "asymkd"),
        ("Deployment", "asymkd-teacher"),
        ("Job", "asymkd-student"),
        ("PersistentVolumeClaim", "asymkd-models"),
        ("PersistentVolumeClaim", "asymkd-runs"),
        ("Service", "asymkd-student"),
        ("Service", "asymkd-teacher"),
        ("Service", "asymkd-teacher-headless"),
    ]
    if overlay != "base":  # an overlay has its own namespace, and every object is in it
        (namespace,) = objects(overlay, "Namespace")
        expected = sorted([*expected, ("Namespace", namespace["metadata"]["name"])])
        names = {o["metadata"].get("namespace") for o in render(overlay) if o["kind"] != "Namespace"}
        assert names == {namespace["metadata"]["name"]}
    assert kinds == expected


def validate(obj: dict) -> None:
    """kubernetes-validate --strict for core kinds; a JSON schema from tests/data for any other (a CRD)."""
    import jsonschema
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        group, _, version = obj["apiVersion"].rpartition("/")
        schema = SCHEMAS / f"{obj['kind'].lower()}-{group.split('.')[0]}-{version}.json"
        assert schema.is_file(), f"{obj['kind']} ({obj['apiVersion']}) is no core kind and has no {schema}"
        jsonschema.validate(obj, json.loads(schema.read_text()))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_passes_strict_schema_validation(overlay):
    for obj in render(overlay):
        validate(obj)


def test_strict_validation_catches_a_misspelled_field():
    import kubernetes_validate

    bad = json.loads(json.dumps(teacher("overlays/prod")))
    container(bad, "teacher")["readinesProbe"] = container(bad, "teacher").pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        validate(bad)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_teacher_probes_are_native_grpc_on_its_numeric_port(overlay, tmp_path):
    c = container(teacher(overlay), "teacher")
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    assert serve_config(overlay, tmp_path).port == grpc_port
    assert serve_config(overlay, tmp_path).host == "0.0.0.0"  # the server's default is 127.0.0.1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": grpc_port, "service": TEACHER_SERVICE}, probe
        assert isinstance(c[probe]["grpc"]["port"], int)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_ports_match_container_ports(overlay):
    workloads = [teacher(overlay), student(overlay)]
    for service in objects(overlay, "Service"):
        selector = service["spec"]["selector"]
        pods = [
            w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, f"Service {service['metadata']['name']} selects {len(pods)} workloads"
        ports = {
            p["containerPort"]: p["name"] for c in pods[0]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }  # fmt: skip
        for port in service["spec"]["ports"]:
            assert isinstance(port["targetPort"], int), port
            assert ports.get(port["targetPort"]) == port["name"], (service["metadata"]["name"], port, ports)


def test_gpus_are_requested_in_prod_and_match_the_parallelism(tmp_path):
    serve, train = serve_config("overlays/prod", tmp_path), train_config("overlays/prod", tmp_path)
    t, s = container(teacher("overlays/prod"), "teacher"), container(student("overlays/prod"), "student")
    for c in (t, s):
        assert c["resources"]["limits"][GPU] == c["resources"]["requests"][GPU] == "8"
    assert serve.backend == "vllm" and serve.tensor_parallel_size * serve.pipeline_parallel_size == 8
    assert env(s)["NPROC_PER_NODE"] == "8" and train.parallel.device == "cuda"
    assert teacher("overlays/prod")["spec"]["replicas"] > 1


@pytest.mark.parametrize("overlay", ["base", "overlays/dev"])
def test_dev_uses_no_gpu_and_the_default_teacher(overlay, tmp_path):
    assert GPU not in json.dumps(render(overlay))
    serve, train = serve_config(overlay, tmp_path), train_config(overlay, tmp_path)
    assert (serve.model, serve.backend, serve.device, train.parallel.device) == (
        "default",
        "hf",
        "cpu",
        "cpu",
    )
    assert teacher(overlay)["spec"]["replicas"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_student_reaches_every_teacher_through_the_headless_service(overlay, tmp_path):
    headless = one(overlay, "Service", "asymkd-teacher-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == teacher(overlay)["spec"]["selector"]["matchLabels"]
    port = next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc")
    name, namespace = headless["metadata"]["name"], headless["metadata"].get("namespace", "default")
    allowed = {f"dns:///{name}:{port}", f"dns:///{name}.{namespace}.svc.cluster.local:{port}"}
    assert train_config(overlay, tmp_path).teacher.targets[0] in allowed
    assert len(train_config(overlay, tmp_path).teacher.targets) == 1
    init = container(student(overlay), "wait-for-teacher", init=True)  # waits for those very targets
    assert init["command"][:5] == ["python3", "-m", "asymkd.hetjob", "wait", "/etc/asymkd/train.yaml"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_termination_grace_covers_the_drain(overlay, tmp_path):
    pod = teacher(overlay)["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace == serve_config(overlay, tmp_path).drain_timeout_s + DRAIN_MARGIN_S
    live = container(teacher(overlay), "teacher")["livenessProbe"]  # a draining server is NOT_SERVING
    assert live["periodSeconds"] * live["failureThreshold"] > grace
    assert teacher(overlay)["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_weights_come_from_the_volume_never_from_an_image_or_a_hub(overlay, tmp_path):
    claims = {o["metadata"]["name"] for o in objects(overlay, "PersistentVolumeClaim")}
    serve, train = serve_config(overlay, tmp_path), train_config(overlay, tmp_path)
    for workload in (teacher(overlay), student(overlay)):
        pod = workload["spec"]["template"]["spec"]
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["image"].split(":")[0] == "asymkd", c["image"]  # the one project image, no model image
        for c in pod["containers"]:
            assert env(c).get("HF_HUB_OFFLINE") == "1" and env(c).get("TRANSFORMERS_OFFLINE") == "1"
    t = container(teacher(overlay), "teacher")
    tpod = teacher(overlay)["spec"]["template"]["spec"]
    # `model: default` is converted into $ASYMKD_CACHE: that too must be the volume
    model = env(t)["ASYMKD_CACHE"] if serve.model == "default" else serve.model
    assert (claim := under_mount(model, t, tpod)) and claim["claimName"] in claims, model
    s, spod = container(student(overlay), "student"), student(overlay)["spec"]["template"]["spec"]
    for path in (train.model.path, train.model.tokenizer, *train.data.paths, train.run.out_dir):
        if path:
            assert (claim := under_mount(path, s, spod)) and claim["claimName"] in claims, path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_config_map_holds_configs_that_load(overlay, tmp_path):
    serve_config(overlay, tmp_path)  # ConfigError (one line naming the key) on any mistake
    train = train_config(overlay, tmp_path)
    assert train.checkpoint.resume is True and train.run.out_dir.startswith("/runs/")
    for workload in (teacher(overlay), student(overlay)):
        pod = workload["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if "configMap" in v]
        for c in pod["containers"] + pod.get("initContainers", []):
            assert {"name": volume["name"], "mountPath": "/etc/asymkd", "readOnly": True} in c["volumeMounts"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_student_is_an_indexed_job_ranked_by_its_completion_index(overlay):
    job = student(overlay)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    nodes = int(env(container(job, "student"))["NNODES"])
    assert spec["completions"] == spec["parallelism"] == nodes
    args = shlex.split(student_command(overlay))
    assert args[:4] == ["exec", "python3", "-m", "asymkd.torchrun"] and args[-5:] == [
        "-m",
        "asymkd.cli",
        "train",
        "--config",
        "/etc/asymkd/train.yaml",
    ]
    flags = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
    assert flags["--nnodes"] == "$NNODES" and flags["--nproc_per_node"] == "$NPROC_PER_NODE"
    assert flags["--node_rank"] == "$JOB_COMPLETION_INDEX"
    # rank 0 hosts the rendezvous: pod 0 of the Job, by its name in the headless Service `subdomain`
    service = one(overlay, "Service", pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert flags["--master_addr"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert int(flags["--master_port"]) in [p["port"] for p in service["spec"]["ports"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shared_memory_and_interfaces(overlay):
    for workload in (teacher(overlay), student(overlay)):
        pod = workload["spec"]["template"]["spec"]
        shm = {v["name"]: v for v in pod["volumes"]}
        (c,) = pod["containers"]
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm[mount["name"]]["emptyDir"]["medium"] == "Memory"
        assert env(c)["NCCL_SOCKET_IFNAME"] == env(c)["GLOO_SOCKET_IFNAME"] == "eth0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_are_exposed_for_prometheus(overlay, tmp_path):
    metrics_port = serve_config(overlay, tmp_path).metrics_port
    c = container(teacher(overlay), "teacher")
    assert {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"} in c["ports"]
    annotations = teacher(overlay)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    service = one(overlay, "Service", "asymkd-teacher")
    assert {
        "name": "metrics",
        "port": metrics_port,
        "targetPort": metrics_port,
        "protocol": "TCP",
    } in service["spec"]["ports"]


def test_the_dockerfile_installs_the_project_and_no_model():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim" in text  # CPU by default; BASE selects a CUDA image
    assert 'pip install ${TORCH} ".${EXTRAS:+[${EXTRAS}]}"' in text
    for copied in [line.split()[1] for line in text.splitlines() if line.startswith("COPY ")]:
        assert (REPO / copied).exists(), copied
    # The image holds no model: its one RUN only installs packages and makes the user and cache folder,
    # and the model libraries run offline (weights come from a volume).
    run = " ".join(line.rstrip("\\") for line in text.split("\nRUN ", 1)[1].split("\n\n", 1)[0].splitlines())
    allowed = ("python3 -m pip install ", "useradd ", "mkdir ", "chown ", "if ", "then ", "fi")
    for command in (c.strip() for part in run.split("&&") for c in part.split(";")):
        assert not command or command.startswith(allowed), command
    assert "HF_HUB_OFFLINE=1" in text and "TRANSFORMERS_OFFLINE=1" in text
    assert "USER 1000" in text  # the pods run as uid 1000 (runAsNonRoot)
