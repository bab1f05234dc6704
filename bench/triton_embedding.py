"""Embeddings/s of the all-MiniLM-L6-v2 Triton model at batch 1 and 32 (dynamic batching), straight to Triton.

    python -m bench.triton_embedding [--concurrency 1,32] [--rounds 3] [--seconds 6] [--max-queue-delay-us 2000]
                                     [--torch-threads 1] [--url HOST:PORT --model NAME] [--out FILE]

Renders a repository with the embedding model (``render_embedding_model``) unless ``--url`` names a running
Triton, then for each level keeps that many single-text requests in flight with ``tritonclient.grpc.aio``
(closed loop, a fixed set of mixed-length sentences): level 1 is batch 1; at 32 Triton's dynamic batcher
forms the batches (up to max_batch_size 64), and the batch size it really ran is read from its metrics
(nv_inference_count / nv_inference_exec_count). Levels interleave over ``--rounds``. Prints a table,
writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tokenizers import Tokenizer
from tritonclient.grpc import InferInput

from inferplane.executor.repository import minilm_dir, render_embedding_model
from inferplane.executor.triton_process import TritonProcess, prepare_backend_dir

ROOT = Path(__file__).resolve().parents[1]
MODEL = "minilm"
SENTENCES = [
    "Hello world",
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Triton batches requests of different lengths into one forward pass.",
    "Return the number of items in the container, or raise a TypeError if it has no length.",
    "An embedding maps a text to a point in a vector space where similar texts lie close together, "
    "so that search, clustering and deduplication become geometry.",
    "Ceci n'est pas une pipe.",
    "What is the capital of France?",
]


def inputs_for(ids: list[int]) -> list[InferInput]:
    t = InferInput("input_ids", [1, len(ids)], "INT64")
    t.set_data_from_numpy(np.asarray([ids], dtype=np.int64))
    return [t]


def exec_stats(metrics_url: str, model: str) -> tuple[float, float]:
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    values = []
    for name in ("nv_inference_count", "nv_inference_exec_count"):
        m = re.search(rf'^{name}{{model="{model}",version="\d+"}} (\S+)$', text, re.M)
        values.append(float(m.group(1)) if m else float("nan"))
    return values[0], values[1]


async def run_level(url: str, model: str, prompts: list[list[int]], concurrency: int, *, seconds: float,
                    warmup: float, metrics_url: str | None) -> dict[str, Any]:
    latencies: list[float] = []
    done = 0
    start = time.perf_counter() + warmup
    end = start + seconds
    stats0: tuple[float, float] | None = None

    async def worker(client: triton_aio.InferenceServerClient, k: int) -> None:
        nonlocal done
        i = k
        while (t0 := time.perf_counter()) < end:
            result = await client.infer(model, inputs_for(prompts[i % len(prompts)]))
            assert result.as_numpy("embedding").shape == (1, 384)
            t1 = time.perf_counter()
            if start <= t1 <= end:
                done += 1
                latencies.append(t1 - t0)
            i += 1

    clients = [triton_aio.InferenceServerClient(url) for _ in range(min(concurrency, 8))]
    tasks = [asyncio.create_task(worker(clients[k % len(clients)], k)) for k in range(concurrency)]
    try:
        await asyncio.sleep(max(start - time.perf_counter(), 0))
        if metrics_url:
            stats0 = exec_stats(metrics_url, model)
        while (now := time.perf_counter()) < end:
            await asyncio.sleep(min(1.0, end - now))
            print(f"  batch {concurrency:>3}  {min(time.perf_counter(), end) - start:4.1f}/{seconds:.0f}s  "
                  f"{done:>6} embeddings", flush=True)
        stats1 = exec_stats(metrics_url, model) if metrics_url else None
        await asyncio.gather(*tasks)
    finally:
        for c in clients:
            await c.close()
    row: dict[str, Any] = {"concurrency": concurrency, "embeddings": done, "window_s": seconds,
                           "latency_ms": latencies}
    if stats0 and stats1 and stats1[1] > stats0[1]:
        row["avg_exec_batch"] = (stats1[0] - stats0[0]) / (stats1[1] - stats0[1])
    return row


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    lat = np.asarray([x for r in rounds for x in r["latency_ms"]] or [float("nan")]) * 1e3
    total = sum(r["embeddings"] for r in rounds)
    window = sum(r["window_s"] for r in rounds)
    batches = [r["avg_exec_batch"] for r in rounds if "avg_exec_batch" in r]
    return {"concurrency": rounds[0]["concurrency"], "embeddings": total, "window_s": window,
            "embeddings_per_s": round(total / window, 1),
            "rounds_embeddings_per_s": [round(r["embeddings"] / r["window_s"], 1) for r in rounds],
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 2),
            "avg_exec_batch": round(float(np.mean(batches)), 2) if batches else None}


async def bench(url: str, model: str, levels: list[int], *, rounds: int, seconds: float, warmup: float,
                metrics_url: str | None) -> list[dict[str, Any]]:
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)
    prompts = [tok.encode(s).ids for s in SENTENCES]
    per_level: dict[int, list[dict[str, Any]]] = {n: [] for n in levels}
    for r in range(1, rounds + 1):
        for n in levels:
            print(f"round {r}/{rounds}: {n} requests in flight", flush=True)
            per_level[n].append(await run_level(url, model, prompts, n, seconds=seconds, warmup=warmup,
                                                metrics_url=metrics_url))
    rows = [summarize(per_level[n]) for n in levels]
    for row in rows[1:]:
        row["ratio_to_batch_1"] = round(row["embeddings_per_s"] / rows[0]["embeddings_per_s"], 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,32", help="requests in flight per level, 1 first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--torch-threads", type=int, default=1, help="the model's torch threads (0 = torch's)")
    parser.add_argument("--url", help="a running Triton's gRPC host:port (default: start one here)")
    parser.add_argument("--metrics-url", help="its metrics endpoint (with --url)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "triton_embedding.json")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-emb-") as tmp:
        server: TritonProcess | None = None
        url, metrics_url = args.url, args.metrics_url
        if url is None:
            render_embedding_model(args.model, minilm_dir(), Path(tmp) / "repo", max_batch_size=args.max_batch_size,
                                   max_queue_delay_us=args.max_queue_delay_us, torch_threads=args.torch_threads)
            server = TritonProcess(Path(tmp) / "repo", backend_dir=prepare_backend_dir(Path(tmp) / "cache"),
                                   log_path=Path(tmp) / "triton.log")
            print("starting tritonserver ...", flush=True)
            server.start()
            server.wait_ready(timeout=300)
            url, metrics_url = server.grpc_url, f"http://{server.host}:{server.metrics_port}/metrics"
        try:
            rows = asyncio.run(bench(url, args.model, levels, rounds=args.rounds, seconds=args.seconds,
                                     warmup=args.warmup, metrics_url=metrics_url))
        finally:
            if server is not None:
                server.stop()
    print()
    head = f"{'batch':>6} {'emb/s':>9} {'ratio':>6} {'p50 ms':>8} {'p99 ms':>8} {'exec batch':>11} {'embeddings':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['concurrency']:>6} {r['embeddings_per_s']:>9.1f} {r.get('ratio_to_batch_1', 1.0):>6.2f} "
              f"{r['latency_ms_p50']:>8.2f} {r['latency_ms_p99']:>8.2f} {r['avg_exec_batch'] or 0:>11.2f} "
              f"{r['embeddings']:>11}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"rounds": args.rounds, "seconds": args.seconds, "max_batch_size": args.max_batch_size,
            "max_queue_delay_us": args.max_queue_delay_us, "torch_threads": args.torch_threads,
            "sentences": len(SENTENCES),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    args.out.write_text(json.dumps({"meta": meta, "levels": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
