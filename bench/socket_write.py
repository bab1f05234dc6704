"""What one streamed chunk's write and read cost on loopback TCP and on a Unix socket (the edge's hop to Envoy).

    python -m bench.socket_write [--connections 32] [--rounds 4000] [--repeat 2]

Two processes on uvloop, as the REST edge and Envoy sit: the writer holds ``--connections`` connections to the
reader and writes one 190-byte SSE-sized chunk on each, then sleeps a millisecond (one model step of 32 streams),
``--rounds`` times; the reader reads whatever arrives. Prints CPU per write (the writer's, its loop included) and
per read (the reader's) for each transport, alternating them ``--repeat`` times. ``inferplane up`` puts Envoy's
upstream to the edge on a Unix socket because of this difference (docs/deployment.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import time
from pathlib import Path

import uvloop

CHUNK = b"data: " + b"x" * 182 + b"\n\n"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _reader(kind: str, where: str, ready_fd: int, result_fd: int) -> None:
    reads = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal reads
        while await reader.read(65536):
            reads += 1
        writer.close()

    if kind == "tcp":
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        where = str(server.sockets[0].getsockname()[1])
    else:
        server = await asyncio.start_unix_server(handle, where)
    os.write(ready_fd, where.encode().ljust(256))
    started, last = _cpu(), -1
    while reads == 0 or reads != last:  # until the writer has stopped for half a second
        last = reads
        await asyncio.sleep(0.5)
    os.write(result_fd, f"{reads} {_cpu() - started}".encode().ljust(64))
    server.close()


async def _writer(kind: str, where: str, connections: int, rounds: int) -> float:
    writers = []
    for _ in range(connections):
        if kind == "tcp":
            _, w = await asyncio.open_connection("127.0.0.1", int(where))
        else:
            _, w = await asyncio.open_unix_connection(where)
        writers.append(w)
    started = _cpu()
    for _ in range(rounds):
        for w in writers:
            w.write(CHUNK)
        await asyncio.sleep(0.001)
    spent = _cpu() - started
    for w in writers:
        w.close()
    return spent


def one(kind: str, connections: int, rounds: int) -> tuple[float, float]:
    """(writer µs per write, reader µs per read) of one run."""
    path = str(Path(tempfile.mkdtemp()) / "bench.sock")
    ready_r, ready_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the reader
        try:
            uvloop.run(_reader(kind, path, ready_w, result_w))
        finally:
            os._exit(0)
    where = os.read(ready_r, 256).decode().strip()
    spent = uvloop.run(_writer(kind, where, connections, rounds))
    reads, reader_cpu = os.read(result_r, 64).decode().split()
    os.waitpid(pid, 0)
    return spent * 1e6 / (connections * rounds), float(reader_cpu) * 1e6 / int(reads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"{args.connections} connections x {args.rounds} rounds of one {len(CHUNK)}-byte write each, 1 ms apart")
    print(f"{'transport':<10} {'writer us/write':>16} {'reader us/read':>15}")
    for _ in range(args.repeat):
        for kind in ("tcp", "unix"):
            t0 = time.perf_counter()
            write_us, read_us = one(kind, args.connections, args.rounds)
            print(f"{kind:<10} {write_us:>16.1f} {read_us:>15.1f}   ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
