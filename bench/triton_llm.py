"""Continuous batching, measured straight against Triton: aggregate tokens/s and inter-token latency.

    python -m bench.triton_llm [--streams 1,8,32] [--rounds 3] [--seconds 8] [--max-tokens 128]
                               [--torch-threads 1] [--url HOST:PORT --model NAME] [--kind KIND_CPU] [--out FILE]

Renders a repository with the shipped tiny-llama (or uses ``--url``'s running Triton), then for each
concurrency level keeps that many ``tritonclient.grpc.aio`` streams busy in a closed loop: each stream sends
one greedy request (a fixed prompt set, ``--max-tokens``), reads it to its final response and sends the
next. After a warm-up, tokens are counted as they arrive for ``--seconds``; requests still running at the
end are cancelled. EOS may end a request early: only tokens that arrived are counted.

The levels are measured in ``--rounds`` interleaved rounds (1, 8, 32, 1, 8, 32, ...), so that a change in
the machine's background load hits every level alike; each round gives its own ratio to the single-stream
figure of that round, and the table shows their median beside the ratio of the pooled figures.

Reports per level: aggregate tokens/s, per-stream inter-token latency (the gap between two token
responses of one request: p50 / p99), time to first token p50, tokens per response (> 1 when the model
coalesced tokens that queued up) and the ratios. Prints a table, writes JSON (and Triton's log beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio

from inferplane.assets import TINY_LLAMA as ASSET_TINY_LLAMA
from inferplane.executor.repository import render_llm_model
from inferplane.executor.triton_client import GenerateParams, build_inputs
from inferplane.executor.triton_process import TritonProcess, prepare_backend_dir
from inferplane.tokenization.bundle import TokenizerBundle

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = ASSET_TINY_LLAMA
MODEL = "tiny-llama"
# Mixed lengths; docstring openings end within ~30-100 tokens, number lists and rulers run to max_tokens.
PROMPTS = [
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "Return the number of",
    "-" * 20,
    "Create a new",
    ">>> x = 1\n>>> x = 2\n>>> x = 3\n>>>",
    "Return a list of the given name. The optional argument is a string, the number of the value of",
    "<s><|user|>What does dumps do?<|end|><|assistant|>",
    "If the value is not None,",
]


def render_llm_repository(out: Path, *, kind: str = "KIND_CPU", torch_threads: int = 1,
                          max_sequences: int = 32, name: str = MODEL) -> Path:
    """A model repository holding tiny-llama as Triton model ``name``; returns ``out``."""
    render_llm_model(name, TINY_LLAMA, out, instance_kind=kind, torch_threads=torch_threads, max_context=512,
                     max_sequences=max_sequences)
    return out


@dataclass
class Level:
    streams: int
    window_s: float = 0.0
    tokens: int = 0
    responses: int = 0
    requests_done: int = 0
    itl_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    rounds_tps: list[float] = field(default_factory=list)  # tokens/s of each round

    def add_round(self, other: Level) -> None:
        self.window_s += other.window_s
        self.tokens += other.tokens
        self.responses += other.responses
        self.requests_done += other.requests_done
        self.itl_s += other.itl_s
        self.ttft_s += other.ttft_s
        self.rounds_tps.append(other.tokens / other.window_s)

    def summary(self, base: Level | None) -> dict[str, Any]:
        itl = np.asarray(self.itl_s or [float("nan")]) * 1e3
        tps = self.tokens / self.window_s if self.window_s else 0.0
        row: dict[str, Any] = {
            "streams": self.streams, "tokens": self.tokens, "window_s": round(self.window_s, 2),
            "tokens_per_s": round(tps, 1), "itl_ms_p50": round(float(np.percentile(itl, 50)), 2),
            "itl_ms_p99": round(float(np.percentile(itl, 99)), 2),
            "ttft_ms_p50": round(float(np.median(self.ttft_s or [float("nan")])) * 1e3, 2),
            "tokens_per_response": round(self.tokens / max(self.responses, 1), 3),
            "requests_done": self.requests_done,
            "rounds_tokens_per_s": [round(x, 1) for x in self.rounds_tps],
        }
        if base is not None and base.tokens:
            row["ratio_to_1_stream"] = round(tps / (base.tokens / base.window_s), 2)
            per_round = [a / b for a, b in zip(self.rounds_tps, base.rounds_tps, strict=True)]
            row["ratio_per_round"] = [round(r, 2) for r in per_round]
            row["ratio_median"] = round(float(np.median(per_round)), 2)
        return row


async def one_stream(client: triton_aio.InferenceServerClient, model: str, prompts: list[list[int]], offset: int,
                     max_tokens: int, level: Level, window: tuple[float, float], stop: asyncio.Event) -> None:
    """Closed loop: one request after another until ``stop``; counts what arrives inside ``window``."""
    i = offset
    while not stop.is_set():
        params = GenerateParams(prompt_token_ids=prompts[i % len(prompts)], max_tokens=max_tokens, temperature=0.0)
        i += 1

        async def requests(p: GenerateParams = params) -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": model, "inputs": build_inputs(p)}

        sent = last = time.perf_counter()
        first = True
        stream = client.stream_infer(requests())
        try:
            async for result, error in stream:
                assert error is None, error
                now = time.perf_counter()
                if result.as_numpy("finish_reason") is not None:
                    if window[0] <= now <= window[1]:
                        level.requests_done += 1
                    break
                n = int(result.as_numpy("token_ids").size)
                if window[0] <= now <= window[1]:
                    level.tokens += n
                    level.responses += 1
                    (level.ttft_s if first else level.itl_s).append(now - (sent if first else last))
                first, last = False, now
                if stop.is_set():
                    break
        finally:
            stream.cancel()


async def run_level(url: str, model: str, prompts: list[list[int]], streams: int, *, seconds: float,
                    warmup: float, max_tokens: int) -> Level:
    level = Level(streams)
    start = time.perf_counter() + warmup
    window = (start, start + seconds)
    stop = asyncio.Event()
    clients = [triton_aio.InferenceServerClient(url) for _ in range(min(streams, 8))]
    tasks = [asyncio.create_task(one_stream(clients[s % len(clients)], model, prompts, s, max_tokens, level,
                                            window, stop)) for s in range(streams)]
    try:
        while (now := time.perf_counter()) < window[1]:
            await asyncio.sleep(min(1.0, max(window[1] - now, 0.01)))
            now = time.perf_counter()
            if now >= start:
                done = min(now, window[1]) - start
                print(f"  {streams:>3} streams  {done:5.1f}/{seconds:.0f}s  {level.tokens:>7} tokens  "
                      f"{level.tokens / max(done, 1e-9):8.1f} tok/s", flush=True)
            else:
                print(f"  {streams:>3} streams  warming up", flush=True)
        level.window_s = seconds
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=60)
        for c in clients:
            await c.close()
    return level


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'streams':>7} {'tokens/s':>10} {'ratio':>6} {'median':>7} {'ITL p50 ms':>11} {'ITL p99 ms':>11} "
            f"{'TTFT p50 ms':>12} {'tok/resp':>9} {'tokens':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['streams']:>7} {r['tokens_per_s']:>10.1f} {r.get('ratio_to_1_stream', 0):>6.2f} "
              f"{r.get('ratio_median', 0):>7.2f} {r['itl_ms_p50']:>11.2f} {r['itl_ms_p99']:>11.2f} "
              f"{r['ttft_ms_p50']:>12.2f} {r['tokens_per_response']:>9.3f} {r['tokens']:>8}")


async def bench(url: str, model: str, levels: list[int], *, rounds: int, seconds: float, warmup: float,
                max_tokens: int) -> list[dict[str, Any]]:
    tok = TokenizerBundle.from_dir(TINY_LLAMA)
    prompts = [tok.encode(p) for p in PROMPTS]
    pooled = {n: Level(n) for n in levels}
    for r in range(1, rounds + 1):
        for n in levels:
            print(f"round {r}/{rounds}: {n} concurrent streams", flush=True)
            level = await run_level(url, model, prompts, n, seconds=seconds, warmup=warmup, max_tokens=max_tokens)
            pooled[n].add_round(level)
    return [pooled[n].summary(pooled[levels[0]]) for n in levels]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,8,32", help="comma-separated concurrency levels, 1 first")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the levels")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window per level and round")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each window")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--torch-threads", type=int, default=1, help="the model's torch threads (0 = torch's)")
    parser.add_argument("--max-sequences", type=int, default=32)
    parser.add_argument("--kind", default="KIND_CPU", choices=["KIND_CPU", "KIND_GPU"])
    parser.add_argument("--url", help="a running Triton's gRPC host:port (default: start one here)")
    parser.add_argument("--model", default=MODEL, help="the Triton model name (with --url)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "triton_llm.json")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.streams.split(",")]
    assert levels[0] == 1, "the first level is the single-stream baseline: --streams 1,..."
    args.out.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        server: TritonProcess | None = None
        url = args.url
        if url is None:
            repo = render_llm_repository(Path(tmp) / "repo", kind=args.kind, torch_threads=args.torch_threads,
                                         max_sequences=args.max_sequences)
            server = TritonProcess(repo, backend_dir=prepare_backend_dir(Path(tmp) / "cache"),
                                   log_path=Path(tmp) / "triton.log")
            print("starting tritonserver ...", flush=True)
            server.start()
            server.wait_ready(timeout=300)
            url = server.grpc_url
        try:
            rows = asyncio.run(bench(url, args.model, levels, rounds=args.rounds, seconds=args.seconds,
                                     warmup=args.warmup, max_tokens=args.max_tokens))
        finally:
            if server is not None:
                server.stop()
                shutil.copyfile(Path(tmp) / "triton.log", args.out.with_suffix(".triton.log"))
    print()
    print_table(rows)
    meta = {"max_tokens": args.max_tokens, "torch_threads": args.torch_threads, "max_sequences": args.max_sequences,
            "kind": args.kind, "rounds": args.rounds, "seconds": args.seconds, "python": sys.version.split()[0],
            "machine": platform.machine(), "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    args.out.write_text(json.dumps({"meta": meta, "levels": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
