"""The one way every inferplane gRPC service is served and every client channel is opened.

``GrpcServer`` gives a service: OpenTelemetry server interception, error mapping (``ErrorInterceptor``: a
precise status plus a ``google.rpc.ErrorInfo`` detail with the error's reason),
the standard health service, server reflection limited to the service's own files (``reflection_pool``), and a
graceful drain (health NOT_SERVING, then
``server.stop(grace)``) on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor

from inferplane.common import wire
from inferplane.common.errors import InferplaneError, Unauthenticated
from inferplane.common.handlers import aclose, rewrap_handler, tracked
from inferplane.common.metrics import MetricsInterceptor, start_metrics_server
from inferplane.common.settings import ServerSettings

log = logging.getLogger(__name__)

Register = Callable[[grpc.aio.Server], None]
# Health checks (probes, the launcher, load balancers) are not traced: they would drown the real traces.
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"


# Calls that live as long as a connection and carry many requests: each request gets a span of its own inside
# (the executor's per-sequence span), never one span for the stream's whole life.
UNTRACED_METHODS = frozenset({"/inferplane.v1.ExecutorService/Channel"})


def not_health(details: Any) -> bool:
    """OpenTelemetry's filter for every call but health checks and the long-lived multiplexed streams
    (``UNTRACED_METHODS``). The library's ``filters.service_name`` does isinstance checks against typing Protocols
    on every call (~5 % of the router's CPU under load); this is two string tests. ``details``: server
    HandlerCallDetails or client ClientCallDetails (method may be bytes)."""
    method = getattr(details, "method", "")
    if isinstance(method, bytes):
        method = method.decode()
    return not method.startswith(HEALTH_METHOD_PREFIX) and method not in UNTRACED_METHODS


@dataclass(frozen=True, slots=True)
class Failure:
    """What an RPC ends with: status, message, the ErrorInfo reason and param, and further trailers."""

    code: grpc.StatusCode
    message: str
    reason: wire.Reason
    param: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()

    def trailers(self) -> tuple[tuple[str, str | bytes], ...]:
        """The trailing metadata: ``grpc-status-details-bin`` (a ``google.rpc.Status`` with one ErrorInfo), the
        param and the older error-code trailer for readers of plain trailers, then ``metadata``
        (``retry-after``, ``x-ratelimit-*``)."""
        status = wire.error_status(self.code, self.message, self.reason, param=self.param)
        out: list[tuple[str, str | bytes]] = [(wire.STATUS_DETAILS, status.SerializeToString())]
        if self.param:
            out.append((wire.PARAM, self.param))
        legacy = wire.ERROR_CODE_OF_REASON.get(self.reason)
        if legacy is not None and all(k != wire.ERROR_CODE for k, _ in self.metadata):
            out.append((wire.ERROR_CODE, legacy))
        return (*out, *self.metadata)


def failure_of(exc: BaseException) -> Failure:
    """The status an exception ends its RPC with."""
    if isinstance(exc, InferplaneError):
        return Failure(exc.code, exc.message, exc.reason, exc.param, tuple(exc.metadata))
    if isinstance(exc, grpc.aio.AioRpcError):
        # A downstream service's precise status passes through (its message was written for callers), with its
        # reason and param when it sent them.
        code = exc.code()
        info = wire.error_info(exc.trailing_metadata())
        reason = wire.reason_from_name(info.reason) if info is not None else wire.REASON_UNSPECIFIED
        param = info.metadata.get(wire.PARAM_INFO_KEY) if info is not None else None
        return Failure(code, exc.details() or code.name, reason or wire.reason_for_status(code), param)
    if isinstance(exc, TimeoutError):
        return Failure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", wire.REASON_TIMEOUT)
    return Failure(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}", wire.REASON_INTERNAL)


def caller_key(metadata: wire.Metadata | None) -> str:
    """The bearer key of a call's ``authorization`` metadata; ``Unauthenticated`` when it has none (OpenAI's
    missing-key text) or an ill-formed one."""
    value = wire.metadata_value(metadata, wire.AUTHORIZATION)
    key = wire.parse_bearer(value)
    if key is None:
        raise Unauthenticated(wire.key_refusal(value))
    return key


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain exceptions into precise gRPC statuses, for all four RPC shapes."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
            failure = failure_of(exc)
            if failure.code == grpc.StatusCode.INTERNAL:
                log.exception("unhandled error in %s", method, exc_info=exc)
            # after what the handler set (the router's x-request-id): abort's own trailers would replace it
            context.set_trailing_metadata((*(context.trailing_metadata() or ()), *failure.trailers()))
            await context.abort(failure.code, failure.message)

        def wrap_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await fn(request, context)
                except InferplaneError as exc:
                    await abort(context, exc)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await abort(context, exc)

            return unary

        def wrap_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    result = fn(request, context)
                    if inspect.isasyncgen(result):
                        # closed by the stream's writer (MetricsInterceptor, outermost) when the RPC ends
                        tracked(result)
                        try:
                            async for item in result:
                                yield item
                        finally:
                            await aclose(result)
                    else:
                        await result
                except InferplaneError as exc:
                    await abort(context, exc)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await abort(context, exc)

            return stream

        return rewrap_handler(handler, unary=wrap_unary, stream=wrap_stream)


def channel_options(max_message_bytes: int = 16 * 1024 * 1024) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def client_channel(target: str, *, max_message_bytes: int = 16 * 1024 * 1024) -> grpc.aio.Channel:
    """An insecure loopback/cluster channel with OpenTelemetry client interceptors (trace propagation)."""
    return grpc.aio.insecure_channel(
        target, options=channel_options(max_message_bytes),
        interceptors=aio_client_interceptors(filter_=not_health),
    )


def reflection_pool(service_names: Iterable[str]) -> descriptor_pool.DescriptorPool:
    """A descriptor pool with only the files that define ``service_names`` and their imports.

    Reflection answers from a pool; the default one holds every message this process imported (the router
    imports the executor's, metering's and tokenizer's stubs as a client), so a reflection client could describe
    internal services by name. This pool knows only what the server serves. A service without a descriptor (a
    generic handler, as in tests) is listed by name but cannot be described.
    """
    default = descriptor_pool.Default()
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:  # imports first: the pool resolves names as files are added
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.AddSerializedFile(proto.SerializeToString())
        added.add(file.name)

    for name in service_names:
        try:
            service = default.FindServiceByName(name)
        except KeyError:
            continue
        add(service.file)
    return pool


class GrpcServer:
    """One grpc.aio server with health, reflection, tracing and error mapping."""

    def __init__(self, settings: ServerSettings, *, service_names: Iterable[str], register: Register,
                 readiness: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.settings = settings
        self.service_names = list(service_names)
        self._register = register
        self._readiness = readiness
        self.health = HealthServicer()
        self.server = grpc.aio.server(
            # MetricsInterceptor first (outermost): it writes response streams (services/common/handlers.py)
            interceptors=[MetricsInterceptor(), aio_server_interceptor(filter_=not_health), ErrorInterceptor()],
            options=channel_options(settings.max_message_bytes),
        )
        self.port = 0
        self.metrics_port: int | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        self._register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflected = [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                     reflection.SERVICE_NAME]
        reflection.enable_server_reflection(reflected, self.server, pool=reflection_pool(reflected))
        self.port = self.server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.settings.host}:{self.settings.port}")
        await self.server.start()
        if self.settings.metrics_port is not None:
            self.metrics_port = start_metrics_server(self.settings.host, self.settings.metrics_port)
        await self.set_serving(await self._readiness() if self._readiness else True)
        log.info("serving %s on %s:%d", ",".join(self.service_names), self.settings.host, self.port)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new RPCs, give in-flight ones ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_seconds if grace is None else grace)
        self._stopped.set()

    async def serve_until_signal(self, on_stop: Callable[[], Awaitable[None]] | None = None, *,
                                 before_drain: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run until SIGTERM/SIGINT, then call ``before_drain``, drain, and call ``on_stop``."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received: draining (grace %.1fs)", self.settings.grace_seconds)
        if before_drain is not None:
            await before_drain()
        await self.stop()
        if on_stop is not None:
            await on_stop()


async def close_stream(call: Any, *, cancel: bool = True) -> None:
    """Cancel a response-streaming client call and run its iterator out, so its client span ends now.

    OpenTelemetry's aio client interceptor ends a streaming call's span only when the response iterator
    finishes; a call that is merely cancelled and dropped would leave its span open (and unexported).
    A cancellation of the calling task itself that arrives meanwhile is re-raised, never swallowed.
    """
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    if cancel:
        call.cancel()
    try:
        async for _ in call:
            pass
    except asyncio.CancelledError:
        if task is not None and task.cancelling() > before:
            raise
    except grpc.aio.AioRpcError:
        pass
