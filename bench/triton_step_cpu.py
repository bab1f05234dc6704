"""Triton's CPU per token: the per-request contract vs the channel (step) mode, same model, same sequences.

    python -m bench.triton_step_cpu [--model fast|tiny] [--sequences 16,32] [--max-tokens 64] [--rounds 2]
                                    [--tokens-per-s 100] [--out FILE]

Starts a tritonserver with the benchmarks' fast model (``--model fast``: tokens at ``--tokens-per-s`` per
sequence, no compute, so Triton's own cost per response shows) or the shipped tiny-llama (``--model tiny``,
``torch_threads`` 1). For each level it runs that many sequences at once, alternating the modes:
- per request: one ``TritonLLMClient.generate`` stream per sequence (the executor's per-request client);
- channel: every sequence through one ``TritonStepBackend`` (one stream, one frame per model round).
and reads the CPU time (user + system, from ``/proc``) of tritonserver and its Python stub processes before and
after, and this process's own CPU (the client: parsing, asyncio). Reports CPU µs per token for Triton (server +
stubs) and for the client, tokens per message, and the model's hop counter ``inferplane_llm_responses_total``.
Not an assertion: figures for the docs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import tempfile
import time
import urllib.request
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from inferplane.assets import TINY_LLAMA
from inferplane.common.catalog import load_catalog
from inferplane.common.errors import InferplaneError
from inferplane.executor.repository import render_llm_model
from inferplane.executor.triton_channel import TritonStepBackend
from inferplane.executor.triton_client import GenerateParams, TritonLLMClient
from inferplane.executor.triton_process import TritonProcess, prepare_backend_dir

FAST_CATALOG = Path(__file__).resolve().parent / "fast_model" / "catalog.yaml"
TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of ``root`` and its descendants (tritonserver and its stubs)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / TICK
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += [child for child, parent in parents.items() if parent == pid]
    return total


def responses_metric(server: TritonProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{server.host}:{server.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r'^inferplane_llm_responses_total\{.*?mode="(\w+)".*?\} (\S+)$',
                                                   text, re.M)}


class CountingSink:
    """Counts what the step backend delivers."""

    def __init__(self, expected: int) -> None:
        self.count, self.ended, self.errors, self.expected = 0, 0, 0, expected
        self.done = asyncio.Event()

    def tokens(self, key: Hashable, token_ids: Sequence[int], logprobs: Sequence[float], top_k: int = 0,
               top_ids: Sequence[int] = (), top_logprobs: Sequence[float] = ()) -> None:
        self.count += len(token_ids)

    def finished(self, key: Hashable, reason: str, prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int = 0) -> None:
        self._end()

    def failed(self, key: Hashable, error: InferplaneError) -> None:
        self.errors += 1
        self._end()

    def _end(self) -> None:
        self.ended += 1
        if self.ended == self.expected:
            self.done.set()


async def per_request(url: str, model: str, params: list[GenerateParams]) -> tuple[int, int]:
    client = TritonLLMClient(url)
    messages = 0

    async def one(p: GenerateParams) -> int:
        nonlocal messages
        n = 0
        async for chunk in client.generate(model, p):
            n += len(chunk.token_ids)
            messages += 1
        return n

    try:
        counts = await asyncio.gather(*(one(p) for p in params))
    finally:
        await client.close()
    return sum(counts), messages


async def channel(url: str, model: str, params: list[GenerateParams]) -> tuple[int, int]:
    backend, sink = TritonStepBackend(url), CountingSink(len(params))
    try:
        for i, p in enumerate(params):
            backend.open(i, model, p, str(i), sink)
        await sink.done.wait()
    finally:
        await backend.close()
    assert sink.errors == 0, f"{sink.errors} sequences failed"
    return sink.count, 0


def run(server: TritonProcess, model: str, mode: str, params: list[GenerateParams]) -> dict[str, Any]:
    assert server.proc is not None
    before_metric = responses_metric(server)
    cpu0, own0, t0 = tree_cpu_s(server.proc.pid), time.process_time(), time.monotonic()
    tokens, _ = asyncio.run((per_request if mode == "request" else channel)(server.grpc_url, model, params))
    cpu1, own1, t1 = tree_cpu_s(server.proc.pid), time.process_time(), time.monotonic()
    time.sleep(1.2)  # the model publishes its response counter at most once a second
    after_metric = responses_metric(server)
    sent = after_metric.get(mode, 0) - before_metric.get(mode, 0)
    return {"mode": mode, "sequences": len(params), "tokens": tokens, "wall_s": round(t1 - t0, 3),
            "triton_cpu_us_per_token": round((cpu1 - cpu0) / tokens * 1e6, 1),
            "client_cpu_us_per_token": round((own1 - own0) / tokens * 1e6, 1),
            "model_responses": sent, "tokens_per_response": round(tokens / sent, 2) if sent else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("fast", "tiny"), default="fast")
    ap.add_argument("--sequences", default="16,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens-per-s", type=float, default=100.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="step-cpu-"))
    if args.model == "fast":
        entry = load_catalog(FAST_CATALOG).get("fast-sim")
        assert entry is not None and entry.checkpoint is not None
        name = "fast-sim"
        render_llm_model(name, entry.checkpoint, work / "repo", template=entry.triton_template,
                         max_context=entry.context_length,
                         extra={"tokens_per_s": str(args.tokens_per_s), "first_token_ms": "20"})
    else:
        name = "llm"
        render_llm_model(name, TINY_LLAMA, work / "repo", torch_threads=1)
    # number lists: greedy tiny-llama keeps counting (docstring openings stop within a few tokens)
    tok = Tokenizer.from_file(str(Path(TINY_LLAMA) / "tokenizer.json"))

    def prompt(i: int) -> list[int]:
        return tok.encode(", ".join(str(k) for k in range(1 + i % 9, 12 + i % 9)) + ",").ids

    results = []
    with TritonProcess(work / "repo", backend_dir=prepare_backend_dir(work / "cache"), log_path=work / "log") as server:
        server.wait_ready(timeout=180)
        for _ in range(args.rounds):
            for n in [int(x) for x in args.sequences.split(",")]:
                params = [GenerateParams(prompt(i), args.max_tokens) for i in range(n)]
                for mode in ("request", "channel"):
                    result = run(server, name, mode, params)
                    results.append(result)
                    print(json.dumps(result), flush=True)
    print(f"\n{'mode':8} {'seqs':>5} {'tokens':>7} {'Triton µs/token':>16} {'client µs/token':>16} {'tokens/resp':>12}")
    for r in results:
        print(f"{r['mode']:8} {r['sequences']:5d} {r['tokens']:7d} {r['triton_cpu_us_per_token']:16.1f} "
              f"{r['client_cpu_us_per_token']:16.1f} {r['tokens_per_response'] or 0:12.2f}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "args": vars(args) | {"out": str(args.out)},
                                        "load_avg": os.getloadavg(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
