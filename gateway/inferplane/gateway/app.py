"""The OpenAI-compatible REST edge: thin routes that call the router's gRPC ``RouterService``.

Request path: ``EdgeMiddleware`` (request id, SERVER span from ``traceparent``, body limit) → route
(API key check, request model, ``Generate``) → JSON body, or ``text/event-stream`` once the router's
first message has arrived (an error before it is a plain JSON error with its status).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferplane.common import wire
from inferplane.common.metrics import LATENCY_BUCKETS
from inferplane.common.server import client_channel, close_stream
from inferplane.gateway.admin import admin_router
from inferplane.gateway.auth import key_metadata
from inferplane.gateway.embeddings import EmbeddingRequest, embeddings_body
from inferplane.gateway.errors import (
    CLIENT_CLOSED_REQUEST,
    INTERNAL_MESSAGE,
    SERVER_ERROR,
    GatewayError,
    body_too_large,
    forwarded_headers,
    from_rpc_error,
    from_validation_error,
    install_handlers,
)
from inferplane.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    ResponseEncoder,
    finish_reason,
    models_body,
    sse_frame,
    usage_dict,
)
from inferplane.gateway.settings import GatewaySettings
from inferplane.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

TRACER_NAME = "inferplane.gateway"
ROUTER_SERVICE = "inferplane.v1.RouterService"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
DONE_FRAME = b"data: [DONE]\n\n"


# --- edge middleware ----------------------------------------------------------------------------------

class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` once the bytes read pass the limit (FastAPI re-raises HTTP exceptions as is)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, body_too_large(limit).message)


HTTP_REQUESTS = Counter("inferplane_gateway_http_requests", "HTTP requests, by route, method and status",
                        ["http_route", "http_request_method", "http_response_status_code"])
HTTP_SECONDS = Histogram("inferplane_gateway_http_request_duration_seconds",
                         "HTTP request duration (streams: until the last byte)", ["http_route", "http_request_method"],
                         buckets=LATENCY_BUCKETS)

# Probes and scrapes: answered, never traced (they would drown the real traces).
UNTRACED_PATHS = frozenset({"/healthz", "/metrics"})
NOOP_TRACER = trace.NoOpTracer()


class EdgeMiddleware:
    """Per request: the request id, a SERVER span (W3C context from the headers), the body size limit.

    Pure ASGI (not ``BaseHTTPMiddleware``) so a streaming response runs in the same task and context.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, tracer: trace.Tracer) -> None:
        self.app = app
        self.limit = max_body_bytes
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get(wire.REQUEST_ID)
        request_id = given if given is not None and wire.valid_request_id(given) else wire.new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        method = scope["method"]
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message["headers"] = [*message.get("headers", []), (wire.REQUEST_ID.encode(), request_id.encode())]
            await send(message)

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge(self.limit)
            return message

        t0 = time.perf_counter()
        context = propagate.extract(dict(headers))
        tracer = NOOP_TRACER if scope["path"] in UNTRACED_PATHS else self.tracer
        with tracer.start_as_current_span(method, context=context, kind=SpanKind.SERVER) as span:
            span.set_attributes({"http.request.method": method, "url.path": scope["path"],
                                 "inferplane.request_id": request_id})
            try:
                early = self._refuse_early(headers, given)
                if early is not None:
                    await early.response()(scope, receive, send_with_id)
                else:
                    await self.app(scope, receive_limited, send_with_id)
            except Exception:
                log.exception("unhandled error in %s %s", method, scope["path"])
                if not started:
                    await GatewayError(500, INTERNAL_MESSAGE, type=SERVER_ERROR).response()(scope, receive,
                                                                                            send_with_id)
            finally:
                route = getattr(scope.get("route"), "path", None)
                HTTP_REQUESTS.labels(route or "unmatched", method, str(status)).inc()
                HTTP_SECONDS.labels(route or "unmatched", method).observe(time.perf_counter() - t0)
                if route is not None:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))

    def _refuse_early(self, headers: Headers, given_id: str | None) -> GatewayError | None:
        if given_id is not None and not wire.valid_request_id(given_id):
            return GatewayError(400, wire.BAD_REQUEST_ID, param=wire.REQUEST_ID)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return body_too_large(self.limit)
        return None


# --- routes -------------------------------------------------------------------------------------------

@dataclass
class RouterClient:
    """What the routes need: the router stubs and the call deadline."""

    stub: router_pb2_grpc.RouterServiceStub
    health: health_pb2_grpc.HealthStub
    timeout_s: float


ParsedT = TypeVar("ParsedT", bound=BaseModel)
WorkT = TypeVar("WorkT")


def _router(request: Request) -> RouterClient:
    client: RouterClient = request.app.state.router
    return client


def _metadata(request: Request) -> tuple[tuple[str, str], ...]:
    """The caller's API key (401 before any router call when absent or ill-formed) and the request id."""
    return (*key_metadata(request.headers), (wire.REQUEST_ID, request.state.request_id))


async def _parse(request: Request, model: type[ParsedT]) -> ParsedT:
    try:
        raw = await request.body()  # the middleware's receive enforces the byte limit
    except ClientDisconnect:
        raise _client_gone() from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _client_gone() -> GatewayError:
    return GatewayError(CLIENT_CLOSED_REQUEST, "The client closed the connection.", code="request_cancelled")


async def _messages(call: Any, first: router_pb2.GenerateResponse) -> AsyncGenerator[router_pb2.GenerateResponse]:
    """The router's messages (``first`` already read) until EOF; a failed call becomes a ``GatewayError``."""
    msg: object = first
    while isinstance(msg, router_pb2.GenerateResponse):
        yield msg
        try:
            msg = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None


async def _first_message(call: Any) -> router_pb2.GenerateResponse:
    try:
        msg = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    if not isinstance(msg, router_pb2.GenerateResponse):
        raise GatewayError(500, INTERNAL_MESSAGE, type=SERVER_ERROR)
    return msg


def _no_finish() -> GatewayError:
    return GatewayError(500, "The generation ended without a finish reason.", type=SERVER_ERROR)


async def _complete(call: Any, first: router_pb2.GenerateResponse, enc: ResponseEncoder) -> dict[str, Any]:
    parts: list[str] = []
    finish: str | None = None
    usage: dict[str, int] | None = None
    async with aclosing(_messages(call, first)) as messages:
        async for msg in messages:
            if finish is not None:
                continue  # nothing counts after the finish message; read on to the call's status
            parts.append(msg.text)
            finish = finish_reason(msg)
            usage = usage_dict(msg)
    if finish is None:
        raise _no_finish()
    return enc.body("".join(parts), finish, usage)


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Awaitable[WorkT], cancel: Callable[[], Awaitable[None]]) -> WorkT:
    """Await ``work``; a caller that disconnects first gets it cancelled (``cancel`` stops the router call, so
    cancellation flows down)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await cancel()
    if task.cancelled():
        raise _client_gone()
    return task.result()


async def _complete_unless_gone(request: Request, call: Any, first: router_pb2.GenerateResponse,
                                enc: ResponseEncoder) -> dict[str, Any]:
    """``_complete``, but a caller that disconnects first cancels the router call."""
    return await _unless_gone(request, _complete(call, first, enc), lambda: close_stream(call))


async def _events(call: Any, first: router_pb2.GenerateResponse, enc: ResponseEncoder) -> AsyncIterator[bytes]:
    """SSE frames; an error after the first byte ends the stream with one ``data: {"error": ...}`` frame."""
    try:
        for chunk in enc.opening():
            yield sse_frame(chunk)
        finish: str | None = None
        usage: dict[str, int] | None = None
        async with aclosing(_messages(call, first)) as messages:
            async for msg in messages:
                if finish is not None:
                    continue
                if msg.text:
                    yield enc.text_frame(msg.text)
                finish = finish_reason(msg)
                if finish is not None:
                    usage = usage_dict(msg)
                    yield sse_frame(enc.finish_chunk(finish))
        if finish is None:
            raise _no_finish()
        if enc.include_usage:
            yield sse_frame(enc.usage_chunk(usage))
        yield DONE_FRAME
    except GatewayError as err:
        span = trace.get_current_span()
        span.set_attribute("inferplane.stream_error", err.code or err.type)
        if err.status >= 500:
            span.set_status(Status(StatusCode.ERROR, err.message))
        yield sse_frame(err.body())


class RouterEventStream(StreamingResponse):
    """An SSE response that cancels its router call however it ends (done, error, client gone)."""

    def __init__(self, call: Any, content: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        self._call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await close_stream(self._call)  # cancels the router call unless it finished; ends its client span
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def _generate(request: Request, model: type[GenerationRequest]) -> Response:
    metadata = _metadata(request)
    body = await _parse(request, model)
    router = _router(request)
    call = router.stub.Generate(body.to_generate_request(), metadata=metadata, timeout=router.timeout_s)
    try:
        first = await _first_message(call)
        headers = forwarded_headers(await call.initial_metadata())
    except BaseException:
        await close_stream(call)
        raise
    enc = body.encoder(first, include_usage=body.include_usage)
    if body.stream:
        return RouterEventStream(call, _events(call, first, enc), headers)
    completion = await _complete_unless_gone(request, call, first, enc)
    cost = (completion.get("usage") or {}).get("cost")
    if cost is not None:
        headers["x-inferplane-cost"] = cost  # exact USD, as usage.cost (a stream has it in its usage chunk)
    return JSONResponse(completion, headers=headers)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, ChatCompletionRequest)


async def completions(request: Request) -> Response:
    return await _generate(request, CompletionRequest)


async def embeddings(request: Request) -> Response:
    metadata = _metadata(request)
    body = await _parse(request, EmbeddingRequest)
    if body.dimensions is not None:
        raise GatewayError(400, "This model does not support the 'dimensions' parameter.", param="dimensions")
    router = _router(request)
    call = router.stub.Embed(body.to_embed_request(), metadata=metadata, timeout=router.timeout_s)

    async def cancel() -> None:
        call.cancel()

    try:
        resp = await _unless_gone(request, call, cancel)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    return JSONResponse(embeddings_body(resp, body))


async def list_models(request: Request) -> Response:
    metadata = _metadata(request)
    router = _router(request)
    try:
        resp = await router.stub.ListModels(router_pb2.ListModelsRequest(), metadata=metadata,
                                            timeout=router.timeout_s)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    return JSONResponse(models_body(resp))


async def metrics(request: Request) -> Response:
    """Prometheus scrape endpoint (the edge never routes it: only /v1 and /admin are public)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def healthz(request: Request) -> Response:
    """200 when the router answers its health check as SERVING, else 503."""
    try:
        resp = await _router(request).health.Check(health_pb2.HealthCheckRequest(service=ROUTER_SERVICE),
                                                   timeout=2.0)
        serving = resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:
        serving = False
    if not serving:
        raise GatewayError(503, "The router is not serving.", type=SERVER_ERROR, code="service_unavailable")
    return JSONResponse({"status": "ok"})


# --- app ----------------------------------------------------------------------------------------------

def create_app(settings: GatewaySettings, *, tracer_provider: trace.TracerProvider | None = None) -> FastAPI:
    """The gateway app; its lifespan opens one channel to the router (``tracer_provider``: for tests)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        channel = client_channel(settings.router_addr)
        app.state.router = RouterClient(router_pb2_grpc.RouterServiceStub(channel),
                                        health_pb2_grpc.HealthStub(channel), settings.request_timeout_s)
        try:
            yield
        finally:
            await channel.close(grace=None)

    # FastAPI's native telemetry is off: the middleware above owns the one SERVER span per request.
    app = FastAPI(title="inferplane gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry={"tracing": False})
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/embeddings", embeddings, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.include_router(admin_router(settings.metering_addr))  # /v1/usage and /admin/*
    install_handlers(app)
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.max_body_bytes,
                       tracer=trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider))
    return app
