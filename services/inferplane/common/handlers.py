"""Rewrapping a gRPC method handler's behaviour, for server interceptors that handle all four RPC shapes, and
writing a response stream so that its generators are closed when the RPC ends.

grpc.aio iterates an async-generator handler and, when the caller cancels, cancels the RPC's task while it
waits to send a message: the generator, and every generator wrapped around it by interceptors, is left
suspended at its ``yield``. Its ``finally`` (the router's usage record, the executor's cancellation, the end of
a trace span) then runs only when the garbage collector finds it, in a task of its own, where OpenTelemetry
cannot detach the context it attached. ``write_stream`` sends the messages itself with ``context.write`` and
closes the generators (``tracked``) in the RPC's own task, as soon as the RPC ends.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncGenerator, Callable
from typing import Any

import grpc

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]

# The response generators of the RPC whose stream ``write_stream`` is writing, outermost first.
_TRACKED: contextvars.ContextVar[list[AsyncGenerator[Any, Any]] | None] = contextvars.ContextVar(
    "inferplane_rpc_generators", default=None)
ALREADY_RUNNING = "asynchronous generator is already running"


def rewrap_handler(handler: grpc.RpcMethodHandler, *, unary: Wrap, stream: Wrap) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped: ``unary`` for single responses, ``stream`` for streams."""
    shapes = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler, unary),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler, stream),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler, unary),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler, stream),
    }
    attr, make, wrap = shapes[(handler.request_streaming, handler.response_streaming)]
    return make(wrap(getattr(handler, attr)), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def tracked(gen: AsyncGenerator[Any, Any]) -> AsyncGenerator[Any, Any]:
    """Have the stream's writer close ``gen`` when the RPC ends (inner generators close before outer ones)."""
    gens = _TRACKED.get()
    if gens is not None:
        gens.append(gen)
    return gen


async def aclose(gen: AsyncGenerator[Any, Any]) -> None:
    """``gen.aclose()``, except that a generator another task is running or closing right now is left to it
    (asyncio raises RuntimeError for a second close; the first one runs the generator's ``finally``)."""
    try:
        await gen.aclose()
    except RuntimeError as exc:
        if not str(exc).endswith(ALREADY_RUNNING):
            raise


async def write_stream(gen: AsyncGenerator[Any, Any], context: grpc.aio.ServicerContext) -> None:
    """Send each message of ``gen`` with ``context.write``. However the RPC ends (finished, failed, or cancelled
    by the caller), close ``gen`` and every generator ``tracked`` under it, innermost first, in this task."""
    gens: list[AsyncGenerator[Any, Any]] = [gen]
    token = _TRACKED.set(gens)
    try:
        async for item in gen:
            await context.write(item)
    finally:
        try:
            failure: BaseException | None = None
            for g in reversed(gens):
                try:
                    await aclose(g)
                except BaseException as exc:  # the others are closed all the same; the first failure is raised
                    failure = failure or exc
            if failure is not None:
                raise failure
        finally:
            _TRACKED.reset(token)
