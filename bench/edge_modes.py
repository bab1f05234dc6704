"""Where the REST edge runs: CPU per request and per token with the gateway in the router's process or apart.

    python -m bench.edge_modes [--requests 64] [--concurrency 16] [--max-tokens 64] [--tokens-per-s 200]
                               [--modes separate in-router]

For each ``inferplane up --edge`` mode in turn, starts a local stack on free ports with the fast model
(``bench/fast_model``: a BENCHMARK INSTRUMENT that emits tokens at a set rate with no compute, standing in for a
GPU), and runs two loads through Envoy (streamed completions, the OpenAI wire format): ``--requests`` of 1 token
and as many of ``--max-tokens`` tokens, at ``--concurrency``. CPU from /proc, idle CPU subtracted, is fitted
into a per-request and a per-token part (the two loads differ only in tokens per request) for the edge
processes (router and gateway, or the one that is both) and for the whole mesh (Triton apart). Also: SSE writes
per token (``inferplane_gateway_sse_writes_total``). Prints a table; no assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench._stack import catalog_with, local_stack, progress
from bench.mesh import snapshot
from bench.mesh_ceiling import FAST_CATALOG, MODEL, SETTLE_S, Client, cpu_delta, is_triton
from bench.soak import processes
from inferplane.cli.launcher import EDGE_MODES, read_env

EDGE_PROCESSES = ("router", "gateway", "router-gateway")


def sse_writes(url: str) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    match = re.search(r"^inferplane_gateway_sse_writes_total (\S+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


async def load(client: Client, pids: dict[str, int], requests: int, concurrency: int, max_tokens: int,
               idle_rate: dict[str, float]) -> tuple[dict[str, float], int]:
    """Busy CPU seconds per process (idle subtracted) of ``requests`` streams of ``max_tokens``; tokens."""
    sem = asyncio.Semaphore(concurrency)

    async def one() -> int:
        async with sem:
            return int((await client.run(max_tokens))["tokens"])

    before, t0 = snapshot(pids), time.perf_counter()
    tokens = sum(await asyncio.gather(*[one() for _ in range(requests)]))
    wall = time.perf_counter() - t0
    await asyncio.sleep(SETTLE_S)
    used = cpu_delta(before, snapshot(pids))
    return {n: max(0.0, cpu - idle_rate.get(n, 0.0) * (wall + SETTLE_S)) for n, cpu in used.items()}, tokens


async def measure(state: Path, requests: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    env = read_env(state / "local.env")
    client = Client(env["INFERPLANE_BASE_URL"], env["INFERPLANE_API_KEY"], concurrency)
    pids = processes(state)
    progress(f"processes: {', '.join(sorted(pids))}")
    gateway_port = yaml.safe_load((state / "stack.yaml").read_text())["gateway"]["port"]
    metrics = f"http://127.0.0.1:{gateway_port}/metrics"  # the gateway's, or the router's with the edge in it
    await asyncio.gather(*[client.run(8) for _ in range(8)])  # warm: connections, caches, tokenizers
    before, t0 = snapshot(pids), time.perf_counter()
    await asyncio.sleep(3.0)
    idle_rate = {n: cpu / (time.perf_counter() - t0) for n, cpu in cpu_delta(before, snapshot(pids)).items()}
    writes0 = sse_writes(metrics)
    short, short_tokens = await load(client, pids, requests, concurrency, 1, idle_rate)
    writes1 = sse_writes(metrics)
    long, long_tokens = await load(client, pids, requests, concurrency, max_tokens, idle_rate)
    writes2 = sse_writes(metrics)
    await client.close()

    def fit(names: list[str]) -> tuple[float, float]:
        s, lg = sum(short.get(n, 0.0) for n in names), sum(long.get(n, 0.0) for n in names)
        per_token = (lg - s) / max(1, long_tokens - short_tokens)
        per_request = s / requests - per_token * short_tokens / requests
        return per_request * 1e3, per_token * 1e6  # ms, µs

    edge = [n for n in pids if n in EDGE_PROCESSES]
    mesh = [n for n in pids if not is_triton(n)]
    return {"edge": fit(edge), "mesh": fit(mesh), "edge_processes": edge,
            "sse_writes_per_token": (writes2 - writes1) / max(1, long_tokens),
            "sse_writes_per_short_request": (writes1 - writes0) / requests,
            "per_process": {n: fit([n]) for n in pids}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--tokens-per-s", type=float, default=200.0, help="the fast model's rate per sequence")
    parser.add_argument("--modes", nargs="+", choices=EDGE_MODES, default=["separate", "in-router"])
    args = parser.parse_args()
    catalog = catalog_with({MODEL: {"triton_parameters": {"tokens_per_s": str(args.tokens_per_s)}}}, FAST_CATALOG)
    results = {}
    for mode in args.modes:
        progress(f"--edge {mode}: starting a stack ...")
        with local_stack(catalog=catalog, edge_mode=mode) as state:
            results[mode] = asyncio.run(measure(state, args.requests, args.concurrency, args.max_tokens))
    print(f"\n{args.requests} streamed completions of 1 and of {args.max_tokens} tokens, concurrency "
          f"{args.concurrency}, fast model at {args.tokens_per_s:g} tokens/s per sequence; CPU with idle subtracted")
    print(f"{'--edge':10s} {'edge ms/req':>12s} {'edge µs/token':>14s} {'mesh ms/req':>12s} {'mesh µs/token':>14s} "
          f"{'SSE writes/token':>17s}  edge processes")
    for mode, r in results.items():
        print(f"{mode:10s} {r['edge'][0]:12.2f} {r['edge'][1]:14.1f} {r['mesh'][0]:12.2f} {r['mesh'][1]:14.1f} "
              f"{r['sse_writes_per_token']:17.2f}  {', '.join(r['edge_processes'])}")
    for mode, r in results.items():
        print(f"  {mode}: " + ", ".join(f"{n} {ms:.2f} ms/req + {us:.1f} µs/token"
                                        for n, (ms, us) in sorted(r["per_process"].items())))


if __name__ == "__main__":
    main()
