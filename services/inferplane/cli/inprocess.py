"""The gateway's ``RouterApi`` in the router's own process: the servicer called in the same event loop.

No protobuf bytes, no HTTP/2 and no second read per message: the REST edge iterates ``RouterServicer.Generate``
itself, with a ``LocalContext`` for what the servicer reads and writes of its gRPC context (metadata, the
deadline). It lives in the CLI, the one package that may import both the gateway and a service.

Both modes answer alike: an exception the servicer raises becomes the status and trailers the router's
``ErrorInterceptor`` would send (``failure_of``), and those become the ``GatewayError`` that the gateway makes of
a failed gRPC call (``from_status``). The router's SERVER span and its RPC metrics are kept, so traces and
dashboards read the same in either mode.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from inferplane.common import wire
from inferplane.common.errors import Unimplemented
from inferplane.common.metrics import RPC_HANDLED, RPC_SECONDS
from inferplane.common.server import failure_of
from inferplane.gateway.errors import INTERNAL_MESSAGE, SERVER_ERROR, GatewayError, forwarded_headers, from_status
from inferplane.router.kserve import SERVICE as KSERVE_SERVICE
from inferplane.router.kserve import KServeServicer
from inferplane.router.service import RouterServicer
from inferplane.v1 import router_pb2

log = logging.getLogger(__name__)

SERVICE = "inferplane.v1.RouterService"
TRACER = trace.get_tracer("inferplane.cli.inprocess")
Metadata = tuple[tuple[str, str], ...]


class LocalContext:
    """What ``RouterServicer`` uses of ``grpc.aio.ServicerContext``, for a call made in this process."""

    __slots__ = ("_deadline", "_metadata", "initial", "trailing")

    def __init__(self, metadata: Metadata, deadline: float) -> None:
        self._metadata = metadata
        self._deadline = deadline
        self.initial: wire.Metadata = ()
        self.trailing: wire.Metadata = ()

    @property
    def grpc(self) -> grpc.aio.ServicerContext:
        """This context where the servicer's signatures say ``grpc.aio.ServicerContext`` (it has what they use)."""
        return cast(grpc.aio.ServicerContext, self)

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def time_remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    async def send_initial_metadata(self, metadata: wire.Metadata) -> None:
        self.initial = tuple(metadata)

    def set_trailing_metadata(self, metadata: wire.Metadata) -> None:
        self.trailing = tuple(metadata)

    def trailing_metadata(self) -> wire.Metadata:
        return self.trailing


def gateway_error(exc: Exception, context: LocalContext) -> GatewayError:
    """The ``GatewayError`` a gRPC caller would see for ``exc``: the interceptor's status and trailers, mapped."""
    failure = failure_of(exc)
    if failure.code == grpc.StatusCode.INTERNAL:
        log.exception("unhandled error in the router", exc_info=exc)
    err = from_status(failure.code, failure.message, (*context.trailing, *failure.trailers()))
    err.headers = {**forwarded_headers(context.initial), **err.headers}
    return err


class _Rpc:
    """One call's SERVER span and its RPC metrics (what the interceptors do for a gRPC call)."""

    __slots__ = ("_method", "_service", "_started", "span")

    def __init__(self, method: str, service: str = SERVICE) -> None:
        self._method = method
        self._service = service
        self._started = time.perf_counter()
        self.span = TRACER.start_span(f"/{service}/{method}", kind=SpanKind.SERVER, attributes={
            "rpc.system": "grpc", "rpc.service": service, "rpc.method": method})

    def end(self, code: grpc.StatusCode, message: str | None = None) -> None:
        RPC_HANDLED.labels(self._service, self._method, code.name).inc()
        RPC_SECONDS.labels(self._service, self._method).observe(time.perf_counter() - self._started)
        self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            self.span.set_status(Status(StatusCode.ERROR, message))
        self.span.end()


class InProcessGenerateCall:
    """One ``Generate``: the servicer's generator, stepped under the call's span.

    The span is made current in the caller's task at the first step and stays so until the call ends (not entered
    and left around every message: that was a context switch of OpenTelemetry's per token); the gateway's task
    makes the call, steps it and closes it, so the span is current in it from the first message to the end."""

    __slots__ = ("_attached", "_context", "_done", "_gen", "_rpc")

    def __init__(self, servicer: RouterServicer, request: router_pb2.GenerateRequest, context: LocalContext) -> None:
        self._context = context
        self._rpc = _Rpc("Generate")
        self._gen = cast(AsyncGenerator[router_pb2.GenerateResponse], servicer.Generate(request, context.grpc))
        self._done = False
        self._attached: object | None = None

    def _enter(self) -> None:
        if self._attached is None and not self._done:
            self._attached = otel_context.attach(trace.set_span_in_context(self._rpc.span))

    def _leave(self) -> None:
        if self._attached is not None:
            token, self._attached = self._attached, None
            otel_context.detach(token)  # type: ignore[arg-type]

    async def _next(self) -> router_pb2.GenerateResponse | None:
        self._enter()
        try:
            return await anext(self._gen)
        except StopAsyncIteration:
            self._end(grpc.StatusCode.OK)
            return None
        except asyncio.CancelledError:
            self._end(grpc.StatusCode.CANCELLED)
            raise
        except Exception as exc:
            err = gateway_error(exc, self._context)
            self._end(failure_of(exc).code, err.message)
            raise err from None

    def _end(self, code: grpc.StatusCode, message: str | None = None) -> None:
        self._leave()
        if not self._done:
            self._done = True
            self._rpc.end(code, message)

    async def first(self) -> router_pb2.GenerateResponse:
        msg = await self._next()
        if msg is None:
            raise GatewayError(500, INTERNAL_MESSAGE, type=SERVER_ERROR)
        return msg

    async def initial_metadata(self) -> wire.Metadata:
        return self._context.initial

    async def messages(self) -> AsyncGenerator[router_pb2.GenerateResponse]:
        while (msg := await self._next()) is not None:
            yield msg

    async def close(self) -> None:
        """Cancel unless finished: the servicer's generator is closed now, in this task (its cleanup cancels the
        executor and records the usage), as the gRPC stream writer closes it when an RPC is cancelled."""
        if self._done:
            self._leave()
            return
        self._enter()
        try:
            await self._gen.aclose()
        finally:
            self._end(grpc.StatusCode.CANCELLED, "cancelled")


class InProcessRouter:
    """``RouterApi`` over the router's servicer in this process; ``serving`` is the router's own state."""

    def __init__(self, servicer: RouterServicer, *, timeout_s: float, serving: Callable[[], bool],
                 kserve: KServeServicer | None = None) -> None:
        """``kserve``: the router's ``inference.GRPCInferenceService`` (None: ``/v2`` answers UNIMPLEMENTED)."""
        self._servicer = servicer
        self._kserve = kserve
        self._timeout_s = timeout_s
        self._serving = serving

    def _context(self, metadata: Metadata) -> LocalContext:
        return LocalContext(metadata, time.monotonic() + self._timeout_s)

    def generate(self, request: router_pb2.GenerateRequest, *, metadata: Metadata) -> InProcessGenerateCall:
        return InProcessGenerateCall(self._servicer, request, self._context(metadata))

    async def _unary(self, method: str, call: Callable[[LocalContext], Any], metadata: Metadata,
                     service: str = SERVICE) -> Any:
        context = self._context(metadata)
        rpc = _Rpc(method, service)
        try:
            with trace.use_span(rpc.span, record_exception=False, set_status_on_exception=False):
                resp = await call(context)
        except asyncio.CancelledError:
            rpc.end(grpc.StatusCode.CANCELLED)
            raise
        except Exception as exc:
            err = gateway_error(exc, context)
            rpc.end(failure_of(exc).code, err.message)
            raise err from None
        rpc.end(grpc.StatusCode.OK)
        return resp

    async def embed(self, request: router_pb2.EmbedRequest, *, metadata: Metadata) -> router_pb2.EmbedResponse:
        resp: router_pb2.EmbedResponse = await self._unary(
            "Embed", lambda ctx: self._servicer.Embed(request, ctx.grpc), metadata)
        return resp

    async def list_models(self, *, metadata: Metadata) -> router_pb2.ListModelsResponse:
        resp: router_pb2.ListModelsResponse = await self._unary(
            "ListModels", lambda ctx: self._servicer.ListModels(router_pb2.ListModelsRequest(), ctx.grpc), metadata)
        return resp

    async def tokenize(self, request: router_pb2.TokenizeRequest, *, metadata: Metadata
                       ) -> router_pb2.TokenizeResponse:
        resp: router_pb2.TokenizeResponse = await self._unary(
            "Tokenize", lambda ctx: self._servicer.Tokenize(request, ctx.grpc), metadata)
        return resp

    async def detokenize(self, request: router_pb2.DetokenizeRequest, *, metadata: Metadata
                         ) -> router_pb2.DetokenizeResponse:
        resp: router_pb2.DetokenizeResponse = await self._unary(
            "Detokenize", lambda ctx: self._servicer.Detokenize(request, ctx.grpc), metadata)
        return resp

    async def count_tokens(self, request: router_pb2.CountTokensRequest, *,
                           metadata: Metadata) -> router_pb2.CountTokensResponse:
        resp: router_pb2.CountTokensResponse = await self._unary(
            "CountTokens", lambda ctx: self._servicer.CountTokens(request, ctx.grpc), metadata)
        return resp

    async def kserve(self, method: str, request: Any, *, metadata: Metadata) -> Any:
        async def unimplemented(request: Any, context: grpc.aio.ServicerContext) -> Any:
            raise Unimplemented(f"{KSERVE_SERVICE} is not served by this router.")

        handler = getattr(self._kserve, method) if self._kserve is not None else unimplemented
        return await self._unary(method, lambda ctx: handler(request, ctx.grpc), metadata, KSERVE_SERVICE)

    async def serving(self) -> bool:
        return self._serving()
