"""The OpenAI-compatible REST edge: thin routes that call the router's gRPC ``RouterService``.

Request path: ``EdgeMiddleware`` (request id, SERVER span from ``traceparent``, body limit) → route
(API key check, request model, ``Generate``) → JSON body, or ``text/event-stream`` once the router's
first message has arrived (an error before it is a plain JSON error with its status).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferplane.common import wire
from inferplane.common.metrics import LATENCY_BUCKETS
from inferplane.common.server import client_channel
from inferplane.gateway.admin import admin_router
from inferplane.gateway.admin_upload import UPLOAD_PATH
from inferplane.gateway.anthropic import count_tokens_route, messages_route
from inferplane.gateway.auth import key_metadata
from inferplane.gateway.disconnect import unless_gone
from inferplane.gateway.embeddings import EmbeddingRequest, embeddings_body
from inferplane.gateway.errors import (
    INTERNAL_MESSAGE,
    SERVER_ERROR,
    GatewayError,
    body_too_large,
    install_handlers,
)
from inferplane.gateway.generation import GENERATION_ROUTES, GenerationEndpoint, parse_body
from inferplane.gateway.kserve import kserve_router
from inferplane.gateway.protocol import models_body
from inferplane.gateway.responses import ResponseStore, create_response, delete_response, get_response
from inferplane.gateway.settings import GatewaySettings
from inferplane.gateway.tokenize import detokenize_route, tokenize_route
from inferplane.gateway.upstream import GrpcRouter, RouterApi

log = logging.getLogger(__name__)

TRACER_NAME = "inferplane.gateway"


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

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, tracer: trace.Tracer,
                 generation: GenerationEndpoint) -> None:
        self.app = app
        self.limit = max_body_bytes
        self.tracer = tracer
        self.generation = generation

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
                if received > self.limit and scope["path"] != UPLOAD_PATH:  # the upload has its own limit
                    raise _BodyTooLarge(self.limit)
            return message

        t0 = time.perf_counter()
        context = propagate.extract(dict(headers))
        tracer = NOOP_TRACER if scope["path"] in UNTRACED_PATHS else self.tracer
        with tracer.start_as_current_span(method, context=context, kind=SpanKind.SERVER) as span:
            span.set_attributes({"http.request.method": method, "url.path": scope["path"],
                                 "inferplane.request_id": request_id})
            try:
                early = self._refuse_early(headers, given, scope["path"])
                if early is not None:
                    await early.response()(scope, receive, send_with_id)
                elif method == "POST" and scope["path"] in GENERATION_ROUTES:
                    # the token path: straight to the raw endpoint, with the unwrapped send (it adds the id)
                    scope["route"] = GENERATION_ROUTE_OBJECTS[scope["path"]]
                    status = await self.generation(scope, receive_limited, send)
                    started = True
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

    def _refuse_early(self, headers: Headers, given_id: str | None, path: str) -> GatewayError | None:
        if given_id is not None and not wire.valid_request_id(given_id):
            return GatewayError(400, wire.BAD_REQUEST_ID, param=wire.REQUEST_ID)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit and path != UPLOAD_PATH:
            return body_too_large(self.limit)
        return None


# --- routes -------------------------------------------------------------------------------------------

def _router(request: Request) -> RouterApi:
    router: RouterApi = request.app.state.router
    return router


def _metadata(request: Request) -> tuple[tuple[str, str], ...]:
    """The caller's API key (401 before any router call when absent or ill-formed) and the request id."""
    return (*key_metadata(request.headers), (wire.REQUEST_ID, request.state.request_id))


async def generation_route(request: Request) -> Response:
    """Registered for routing's sake (a GET is a 405); ``EdgeMiddleware`` answers every POST itself."""
    raise GatewayError(500, INTERNAL_MESSAGE, type=SERVER_ERROR)


# The route each generation path reports (metrics label, span name), as routing would set it.
GENERATION_ROUTE_OBJECTS = {path: Route(path, generation_route, methods=["POST"]) for path in GENERATION_ROUTES}


async def embeddings(request: Request) -> Response:
    metadata = _metadata(request)
    body = await parse_body(request, EmbeddingRequest)
    if body.dimensions is not None:
        raise GatewayError(400, "This model does not support the 'dimensions' parameter.", param="dimensions")
    resp = await unless_gone(request, _router(request).embed(body.to_embed_request(), metadata=metadata))
    return JSONResponse(embeddings_body(resp, body))


async def list_models(request: Request) -> Response:
    metadata = _metadata(request)
    return JSONResponse(models_body(await _router(request).list_models(metadata=metadata)))


async def metrics(request: Request) -> Response:
    """Prometheus scrape endpoint (the edge never routes it: only /v1 and /admin are public)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def healthz(request: Request) -> Response:
    """200 when the router answers its health check as SERVING, else 503."""
    if not await _router(request).serving():
        raise GatewayError(503, "The router is not serving.", type=SERVER_ERROR, code="service_unavailable")
    return JSONResponse({"status": "ok"})


def _state_router(app: FastAPI) -> RouterApi:
    router: RouterApi = app.state.router
    return router


# --- app ----------------------------------------------------------------------------------------------

def create_app(settings: GatewaySettings, *, tracer_provider: trace.TracerProvider | None = None,
               router: RouterApi | None = None) -> FastAPI:
    """The gateway app. ``router``: the router in this process (``inferplane.cli.edge``); without it the lifespan
    opens one channel to ``settings.router_addr``. ``tracer_provider``: the gateway's own (tests, the router's
    process)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if router is not None:
            app.state.router = router
            yield
            return
        channel = client_channel(settings.router_addr)
        app.state.router = GrpcRouter(channel, settings.request_timeout_s)
        try:
            yield
        finally:
            await channel.close(grace=None)

    # FastAPI's native telemetry is off: the middleware above owns the one SERVER span per request.
    app = FastAPI(title="inferplane gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry={"tracing": False})
    for path in GENERATION_ROUTES:
        app.add_api_route(path, generation_route, methods=["POST"])
    app.add_api_route("/v1/embeddings", embeddings, methods=["POST"])
    app.add_api_route("/v1/messages", messages_route, methods=["POST"])  # Anthropic's Messages API
    app.add_api_route("/v1/messages/count_tokens", count_tokens_route, methods=["POST"])
    app.state.responses = ResponseStore()  # OpenAI's Responses API, its stored responses in this process
    app.add_api_route("/v1/responses", create_response, methods=["POST"])
    app.add_api_route("/v1/responses/{response_id}", get_response, methods=["GET"])
    app.add_api_route("/v1/responses/{response_id}", delete_response, methods=["DELETE"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/tokenize", tokenize_route, methods=["POST"])  # vLLM's paths: no /v1
    app.add_api_route("/detokenize", detokenize_route, methods=["POST"])
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.include_router(admin_router(  # /v1/usage, /admin/* and /dashboard/
        settings.metering_addr, uploads_dir=Path(settings.uploads_dir) if settings.uploads_dir else None,
        max_upload_bytes=settings.max_upload_bytes, dashboard_credentials_file=settings.dashboard_credentials_file,
        router_metrics_url=settings.router_metrics_url))
    app.include_router(kserve_router(unless_gone))  # /v2: the KServe v2 protocol (tritonclient.http)
    install_handlers(app)
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.max_body_bytes,
                       tracer=trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider),
                       generation=GenerationEndpoint(lambda: _state_router(app)))
    return app
