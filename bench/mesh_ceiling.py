"""The mesh's own ceiling: delivered tokens/s and CPU per token with the fast model (no model compute).

    python -m bench.mesh_ceiling [--streams 64 256] [--tokens-per-s 50] [--max-tokens 256] [--rounds 2]

Starts a local stack on free ports (what ``inferplane up`` runs: Envoy, gateway, router, executor + Triton,
metering) with ``bench/fast_model/catalog.yaml``: its one model, "fast-sim", is a BENCHMARK INSTRUMENT that emits
token ids at ``--tokens-per-s`` per sequence with no compute (``bench/fast_model/model.py``), standing in for a GPU.
Then, for each stream count N: an idle window first (each process's idle CPU rate), then ``--rounds`` rounds of N
concurrent streamed completions of ``--max-tokens`` tokens through Envoy (the OpenAI wire format, httpx).

Figures per N: delivered tokens/s (against the N × rate the "GPU" offers), TTFT and the gap between chunks
(p50), tokens per SSE chunk (how much the hops coalesced), and CPU per delivered token from /proc with the idle
CPU subtracted: each mesh process (Envoy, gateway, router, executor, metering, tokenizer when running), their
total, Triton's own (tritonserver and its Python-backend stub) beside it, and the benchmark client's. From the mesh
total: the cores, and the one-core Python processes, that a GPU producing 10,000 tokens/s would need at the edge.

Prints a table, writes ``bench/results/mesh_ceiling.json`` and ``bench/results/mesh_ceiling.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench._stack import catalog_with, local_stack, progress
from bench.mesh import pct, snapshot
from bench.soak import processes
from inferplane.cli.launcher import read_env

FAST_CATALOG = Path(__file__).resolve().parent / "fast_model" / "catalog.yaml"
MODEL = "fast-sim"
PROMPT = "Return the"
SETTLE_S = 1.5  # CPU is read this long after the last stream ends (idle CPU over it is subtracted too)
GPU_TOKENS_PER_S = 10_000  # the GPU the edge is sized for (an 8B model at batch 64: 5,000-10,000 tokens/s)


def is_triton(name: str) -> bool:
    return "/" in name  # processes() names the executor's children "executor/tritonserver", "executor/python-stub-1"


class Client:
    """Streamed completions through Envoy, the OpenAI wire format (what the ``openai`` SDK sends and reads)."""

    def __init__(self, base_url: str, key: str, streams: int) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=300,
                                      limits=httpx.Limits(max_connections=streams, max_keepalive_connections=streams))

    async def run(self, max_tokens: int) -> dict[str, Any]:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        times: list[float] = []
        tokens = 0
        async with self.http.stream("POST", "/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                obj = json.loads(line[6:])
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                elif obj["choices"] and obj["choices"][0]["text"]:
                    times.append(time.perf_counter() - t0)
        assert tokens == max_tokens, f"asked {max_tokens} tokens, got {tokens}"
        return {"ttft": times[0] if times else float("nan"), "times": times, "tokens": tokens}

    async def close(self) -> None:
        await self.http.aclose()


def cpu_delta(before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]]) -> dict[str, float]:
    return {name: after[name][0] - before[name][0] for name in after if name in before}


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def one_load(client: Client, pids: dict[str, int], streams: int, rounds: int, max_tokens: int,
                    idle_s: float, rate: float) -> dict[str, Any]:
    progress(f"  {streams} streams: idle window {idle_s:g}s ...")
    before, t0 = snapshot(pids), time.perf_counter()
    await asyncio.sleep(idle_s)
    idle_rate = {n: cpu / (time.perf_counter() - t0) for n, cpu in cpu_delta(before, snapshot(pids)).items()}
    progress(f"  {streams} streams: {rounds} rounds of {max_tokens} tokens ...")
    before, client_before, t0 = snapshot(pids), own_cpu(), time.perf_counter()
    results = []
    for _ in range(rounds):
        results += await asyncio.gather(*[client.run(max_tokens) for _ in range(streams)])
    wall = time.perf_counter() - t0
    client_cpu = own_cpu() - client_before
    await asyncio.sleep(SETTLE_S)  # the usage records reach metering after the streams end
    used = cpu_delta(before, snapshot(pids))
    tokens = sum(r["tokens"] for r in results)
    chunks = sum(len(r["times"]) for r in results)
    busy = {n: max(0.0, cpu - idle_rate.get(n, 0.0) * (wall + SETTLE_S)) for n, cpu in used.items()}
    per_token_us = {n: cpu * 1e6 / tokens for n, cpu in busy.items()}
    mesh_us = sum(v for n, v in per_token_us.items() if not is_triton(n))
    triton_us = sum(v for n, v in per_token_us.items() if is_triton(n))
    gaps = [(b - a) * 1000 for r in results for a, b in itertools.pairwise(r["times"])]
    cores = GPU_TOKENS_PER_S * mesh_us / 1e6
    return {
        "streams": streams, "requests": len(results), "tokens": tokens, "wall_s": wall,
        "offered_tokens_per_s": streams * rate, "delivered_tokens_per_s": tokens / wall,
        "ttft_p50_ms": pct([r["ttft"] * 1000 for r in results], 0.5),
        "ttft_p99_ms": pct([r["ttft"] * 1000 for r in results], 0.99),
        "chunk_gap_p50_ms": pct(gaps, 0.5), "chunk_gap_p99_ms": pct(gaps, 0.99), "tokens_per_chunk": tokens / chunks,
        "idle_cpu_rate": idle_rate, "cpu_s": used, "cpu_us_per_token": per_token_us,
        "mesh_cpu_us_per_token": mesh_us, "triton_cpu_us_per_token": triton_us,
        "client_cpu_us_per_token": client_cpu * 1e6 / tokens,
        "mesh_cores_used": sum(v for n, v in busy.items() if not is_triton(n)) / wall,
        f"edge_cores_for_{GPU_TOKENS_PER_S}": cores,
        # each Python service is one process using at most about one core (the GIL); Envoy's threads share cores
        f"edge_processes_for_{GPU_TOKENS_PER_S}": {n: math.ceil(GPU_TOKENS_PER_S * v / 1e6)
                                                   for n, v in per_token_us.items() if not is_triton(n)},
    }


async def measure(state: Path, streams: list[int], rounds: int, max_tokens: int, idle_s: float,
                  rate: float) -> list[dict[str, Any]]:
    env = read_env(state / "local.env")
    client = Client(env["INFERPLANE_BASE_URL"], env["INFERPLANE_API_KEY"], max(streams))
    pids = processes(state)
    progress(f"processes: {', '.join(sorted(pids))}")
    await asyncio.gather(*[client.run(8) for _ in range(8)])  # warm: connections, caches
    out = [await one_load(client, pids, n, rounds, max_tokens, idle_s, rate) for n in streams]
    await client.close()
    return out


def table(results: list[dict[str, Any]], rate: float) -> str:
    key = f"edge_processes_for_{GPU_TOKENS_PER_S}"
    head = f"{'figure':<44}" + "".join(f"{str(r['streams']) + ' streams':>14}" for r in results)
    rows: list[tuple[str, list[str]]] = [
        (f"offered tokens/s (N x {rate:g}/s)", [f"{r['offered_tokens_per_s']:,.0f}" for r in results]),
        ("delivered tokens/s", [f"{r['delivered_tokens_per_s']:,.0f}" for r in results]),
        ("TTFT p50 ms", [f"{r['ttft_p50_ms']:.0f}" for r in results]),
        ("gap between chunks p50 ms", [f"{r['chunk_gap_p50_ms']:.1f}" for r in results]),
        ("tokens per SSE chunk", [f"{r['tokens_per_chunk']:.2f}" for r in results]),
    ]
    names = sorted({n for r in results for n in r["cpu_us_per_token"] if not is_triton(n)})
    rows += [(f"CPU us/token: {n}", [f"{r['cpu_us_per_token'].get(n, 0):.0f}" for r in results]) for n in names]
    rows += [
        ("CPU us/token: MESH TOTAL", [f"{r['mesh_cpu_us_per_token']:.0f}" for r in results]),
        ("CPU us/token: Triton (server + stub)", [f"{r['triton_cpu_us_per_token']:.0f}" for r in results]),
        ("CPU us/token: benchmark client", [f"{r['client_cpu_us_per_token']:.0f}" for r in results]),
        ("mesh cores busy", [f"{r['mesh_cores_used']:.2f}" for r in results]),
        (f"edge cores for {GPU_TOKENS_PER_S:,} tokens/s", [f"{r[f'edge_cores_for_{GPU_TOKENS_PER_S}']:.1f}"
                                                          for r in results]),
        (f"edge processes for {GPU_TOKENS_PER_S:,} tokens/s", [str(sum(r[key].values())) for r in results]),
    ]
    lines = [head] + [f"{name:<44}" + "".join(f"{v:>14}" for v in vals) for name, vals in rows]
    lines.append("\nprocesses per service for a 10,000 tokens/s GPU (one core each): " + "; ".join(
        f"{r['streams']} streams: " + ", ".join(f"{n} {c}" for n, c in sorted(r[key].items())) for r in results))
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['streams']} streams" for r in results]
    ax = axes[0]
    ax.bar([i - 0.2 for i in range(len(results))], [r["offered_tokens_per_s"] for r in results], 0.4,
           label="offered (fast model)")
    ax.bar([i + 0.2 for i in range(len(results))], [r["delivered_tokens_per_s"] for r in results], 0.4,
           label="delivered through the mesh")
    ax.set_xticks(range(len(results)), labels)
    ax.set_title("tokens/s")
    ax.legend()
    ax = axes[1]
    names = sorted({n for r in results for n in r["cpu_us_per_token"]}, key=lambda n: (is_triton(n), n))
    bottom = [0.0] * len(results)
    for n in names:
        vals = [r["cpu_us_per_token"].get(n, 0.0) for r in results]
        ax.bar(labels, vals, bottom=bottom, label=n, hatch="//" if is_triton(n) else None)
        bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
    ax.set_title("CPU us per delivered token (idle subtracted)")
    ax.legend(fontsize=7)
    fig.suptitle("inferplane mesh ceiling with the fast model (a benchmark instrument, no model compute)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--tokens-per-s", type=float, default=50.0, help="the fast model's rate per sequence")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of N concurrent streams per N")
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle window before each load")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    catalog = catalog_with({MODEL: {"triton_parameters": {"tokens_per_s": str(args.tokens_per_s)}}}, FAST_CATALOG)
    with local_stack(catalog=catalog) as state:
        results = asyncio.run(measure(state, args.streams, args.rounds, args.max_tokens, args.idle_s,
                                      args.tokens_per_s))
    print(f"fast-sim at {args.tokens_per_s:g} tokens/s per sequence, {args.rounds} rounds of {args.max_tokens}-token "
          f"completions per stream count, {os.cpu_count()} cores")
    print(table(results, args.tokens_per_s))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mesh_ceiling.json").write_text(json.dumps(
        {"tokens_per_s_per_sequence": args.tokens_per_s, "max_tokens": args.max_tokens, "rounds": args.rounds,
         "cpu_count": os.cpu_count(), "loads": results}, indent=2))
    plot(results, args.out / "mesh_ceiling.png")
    print(f"\nwrote {args.out / 'mesh_ceiling.json'} and {args.out / 'mesh_ceiling.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
