"""grpc.aio on uvloop: does it work, and what does a streamed message cost on each loop.

    python -m bench.uvloop_grpc [--streams 32] [--messages 2000]

Runs a grpc.aio server and client in one process, first on asyncio's loop, then on uvloop: ``--streams``
concurrent server streams of ``--messages`` messages each, then a cancelled stream, a deadline and a bidi
stream (each checked). Prints messages/s and CPU per message (server and client together) per loop.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc
import uvloop


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(int(request)):
        yield b"x" * 16


async def _bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for r in requests:
        yield r


async def check(streams: int, messages: int) -> str:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {
        "S": grpc.unary_stream_rpc_method_handler(_stream),
        "B": grpc.stream_stream_rpc_method_handler(_bidi)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.unary_stream("/t.T/S", None, None)  # bytes in, bytes out
        bidi = channel.stream_stream("/t.T/B", None, None)

        async def one() -> int:
            return len([m async for m in stream(str(messages).encode(), timeout=60)])

        cpu, wall = time.process_time(), time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(streams)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        assert counts == [messages] * streams, counts
        call = stream(b"1000000")
        await call.read()
        call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED
        try:
            async for _ in stream(b"100000000", timeout=0.2):
                pass
            raise AssertionError("the deadline did not end the stream")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc.code()
        duplex = bidi(None)
        for i in range(100):
            await duplex.write(str(i).encode())
            assert await duplex.read() == str(i).encode()
        await duplex.done_writing()
    await server.stop(0)
    total = streams * messages
    return f"{total / wall:9.0f} msg/s, {cpu / total * 1e6:6.1f} µs CPU/msg; cancel, deadline, bidi ok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    loops: dict[str, Callable[[Coroutine[Any, Any, str]], str]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}
    for name, run in loops.items():
        print(f"{name:8s} {run(check(args.streams, args.messages))}", flush=True)


if __name__ == "__main__":
    main()
