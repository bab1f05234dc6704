"""What one grpc.aio message costs between two processes at a model step's pace, on loopback TCP and a Unix socket.

    python -m bench.grpc_message [--messages 5000] [--interval-ms 1] [--repeat 2]

A server process streams ``--messages`` 300-byte messages to a client process, one every ``--interval-ms`` (as the
executor sends one frame per model step and the router reads it), both on uvloop. Prints the CPU per message of
each side (from ``getrusage``, the server's pacing timer included) for each transport, alternating them
``--repeat`` times. At these rates a message costs far more than its bytes: each crosses gRPC's threads (the event
loop, gRPC's engine and poller) with a wake-up at each handoff; the transport under it barely shows
(docs/benchmarks.md, "round three").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import uvloop

MESSAGE = b"y" * 300


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _server(address: str, messages: int, interval_s: float, ready_fd: int, result_fd: int) -> None:
    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        started = _cpu()
        for _ in range(messages):
            yield MESSAGE
            await asyncio.sleep(interval_s)
        os.write(result_fd, f"{_cpu() - started}".encode().ljust(64))

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Messages", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream)}),))
    port = server.add_insecure_port(address)
    await server.start()
    os.write(ready_fd, str(port).encode().ljust(16))
    await server.wait_for_termination(timeout=messages * interval_s * 3 + 10)


async def _client(target: str) -> tuple[int, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_stream("/bench.Messages/Stream", None, None)(b"")  # bytes in, bytes out
        started, n = _cpu(), 0
        async for _ in call:
            n += 1
        return n, _cpu() - started


def one(kind: str, messages: int, interval_s: float) -> tuple[float, float]:
    """(server µs per message, client µs per message) of one run."""
    path = str(Path(tempfile.mkdtemp()) / "bench.sock")
    address = "127.0.0.1:0" if kind == "tcp" else f"unix:{path}"
    ready_r, ready_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server
        try:
            uvloop.run(_server(address, messages, interval_s, ready_w, result_w))
        finally:
            os._exit(0)
    port = int(os.read(ready_r, 16).decode().strip())
    n, client_cpu = uvloop.run(_client(f"127.0.0.1:{port}" if kind == "tcp" else address))
    server_cpu = float(os.read(result_r, 64).decode().strip())
    os.kill(pid, 15)
    os.waitpid(pid, 0)
    return server_cpu * 1e6 / messages, client_cpu * 1e6 / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--interval-ms", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"{args.messages} messages of {len(MESSAGE)} bytes, one every {args.interval_ms:g} ms, server -> client")
    print(f"{'transport':<10} {'server us/msg':>14} {'client us/msg':>14}")
    for _ in range(args.repeat):
        for kind in ("tcp", "unix"):
            server_us, client_us = one(kind, args.messages, args.interval_ms / 1000)
            print(f"{kind:<10} {server_us:>14.1f} {client_us:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
