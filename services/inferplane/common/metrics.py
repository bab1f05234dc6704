"""Prometheus metrics: one scrape endpoint per service, and a gRPC interceptor counting every RPC.

Names follow the OpenTelemetry GenAI semantic conventions where they exist (``gen_ai.server.*``,
``gen_ai.client.token.usage``) in their Prometheus spelling (dots to underscores, unit suffix).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram, start_http_server

from inferplane.common.handlers import rewrap_handler, write_stream

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

RPC_HANDLED = Counter("inferplane_grpc_server_handled", "gRPC calls handled, by method and status code",
                      ["grpc_service", "grpc_method", "grpc_code"])
RPC_SECONDS = Histogram("inferplane_grpc_server_handling_seconds", "gRPC call duration (streams: until the end)",
                        ["grpc_service", "grpc_method"], buckets=LATENCY_BUCKETS)


def start_metrics_server(host: str, port: int) -> int:
    """Serve /metrics on ``host:port`` (0 = a free port) in a thread; return the bound port."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_address[1])


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by status code and times it; health checks are counted like any other call."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split(handler_call_details.method)

        def done(context: grpc.aio.ServicerContext, started: float, failed: BaseException | None) -> None:
            code = context.code()
            if code is None:
                code = grpc.StatusCode.CANCELLED if failed is not None else grpc.StatusCode.OK
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            RPC_HANDLED.labels(service, method, name).inc()
            RPC_SECONDS.labels(service, method).observe(time.perf_counter() - started)

        def wrap_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started, failed = time.perf_counter(), None
                try:
                    return await fn(request, context)
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    done(context, started, failed)

            return unary

        def wrap_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
            # The outermost interceptor: it writes the stream itself, so that a cancelled stream's generators are
            # closed (and counted here) when the RPC ends, not when they are collected.
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                started, failed = time.perf_counter(), None
                try:
                    await write_stream(fn(request, context), context)
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    done(context, started, failed)

            return stream

        return rewrap_handler(handler, unary=wrap_unary, stream=wrap_stream)
