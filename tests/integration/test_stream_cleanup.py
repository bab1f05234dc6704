"""A streaming handler whose caller leaves is closed when the RPC ends, not when the garbage collector finds it.

grpc.aio leaves the handler's async generator suspended at its ``yield`` when the caller cancels; its
``finally`` (the router's usage record and executor cancellation) then waited for a garbage collection, which
the ledger test once saw as a record missing after 60 s. The shared server closes it when the RPC is done.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from inferplane.common.server import GrpcServer
from inferplane.common.settings import ServerSettings


async def test_a_cancelled_streams_handler_is_closed_at_once() -> None:
    closed = asyncio.Event()
    sent = asyncio.Event()

    async def forever(request: bytes, context: grpc.aio.ServicerContext, box: list[object]) -> AsyncIterator[bytes]:
        try:
            while True:
                sent.set()
                yield b"token"
        finally:
            closed.set()

    def handler_fn(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        box: list[object] = []
        gen = forever(request, context, box)
        box.append(gen)  # generator -> frame -> box -> generator: only a collection would free it
        return gen

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.unary_stream_rpc_method_handler(handler_fn)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Stream", {"Forever": handler}),))

    server = GrpcServer(ServerSettings(port=0), service_names=["test.Stream"], register=register)
    port = await server.start()
    gc.disable()  # nothing may depend on a collection
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream("/test.Stream/Forever")(b"", timeout=30)
            assert await call.read() == b"token"
            await sent.wait()
            call.cancel()
        # a hang guard, not a speed bound: without the fix this waits for a gc that never comes
        await asyncio.wait_for(closed.wait(), timeout=20)
    finally:
        gc.enable()
        await server.stop(0)


async def test_two_closes_of_one_handler_log_no_error(caplog: pytest.LogCaptureFixture) -> None:
    """The RPC's end closes the handler from a task of its own; when the collector then closes the interceptors'
    generators around it while that close is still running, the second close leaves it be (it used to be logged
    as 'unhandled error ... asynchronous generator is already running')."""
    closing, release, closed = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def forever(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"token"
        finally:
            closing.set()
            await release.wait()  # cleanup that awaits (the router cancels the executor here)
            closed.set()

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.unary_stream_rpc_method_handler(forever)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Stream", {"Forever": handler}),))

    server = GrpcServer(ServerSettings(port=0), service_names=["test.Stream"], register=register)
    port = await server.start()
    try:
        with caplog.at_level(logging.ERROR):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_stream("/test.Stream/Forever")(b"", timeout=30)
                assert await call.read() == b"token"
                call.cancel()
            await asyncio.wait_for(closing.wait(), timeout=20)  # hang guard
            for _ in range(3):  # the generators around the handler are collected while its close still runs
                gc.collect()
                await asyncio.sleep(0.05)
            release.set()
            await asyncio.wait_for(closed.wait(), timeout=20)
            await asyncio.sleep(0.05)
    finally:
        await server.stop(0)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
