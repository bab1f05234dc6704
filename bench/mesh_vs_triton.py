"""Time to first token and tokens/s of one greedy completion: through the mesh vs straight to Triton.

    python -m bench.mesh_vs_triton [--tokens 64] [--runs 7] [--state-dir DIR]

Starts a local stack (as ``inferplane up`` does, on free ports) unless ``--state-dir`` names one that
runs already, then alternates, in the same run: a streaming completion through the REST gateway (the
``openai`` client), the same through the router's gRPC API, and the same prompt ids sent directly to
Triton with ``tritonclient.grpc.aio``. Prints medians and mesh/direct ratios; writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import openai
import tritonclient.grpc.aio as triton_aio
import yaml

from bench._stack import local_stack
from inferplane.cli.launcher import read_env
from inferplane.common.catalog import load_catalog
from inferplane.executor.triton_client import GenerateParams, build_inputs
from inferplane.tokenization.bundle import TokenizerBundle
from inferplane.v1 import router_pb2, router_pb2_grpc

PROMPT = "Return the"
MODEL = "tiny-llama"


def summarize(samples: list[tuple[float, float, int]]) -> dict[str, float]:
    ttft = [s[0] for s in samples]
    total = [s[1] for s in samples]
    tokens = [s[2] for s in samples]
    return {"ttft_ms_p50": statistics.median(ttft) * 1000, "total_ms_p50": statistics.median(total) * 1000,
            "tokens": statistics.median(tokens),
            "tokens_per_s_p50": statistics.median(n / t for n, t in zip(tokens, total, strict=True))}


async def direct_triton(url: str, triton_model: str, params: GenerateParams) -> tuple[float, float, int]:
    client = triton_aio.InferenceServerClient(url)
    try:
        async def reqs() -> Any:
            yield {"model_name": triton_model, "inputs": build_inputs(params)}

        t0 = time.perf_counter()
        first = None
        n = 0
        async for result, error in client.stream_infer(reqs()):
            assert error is None, error
            ids = result.as_numpy("token_ids")
            if ids is not None and ids.size:
                n += int(ids.size)
                first = first or time.perf_counter()
            if result.as_numpy("finish_reason") is not None:
                break
        return (first or time.perf_counter()) - t0, time.perf_counter() - t0, n
    finally:
        await client.close()


def via_rest(client: openai.OpenAI, tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = None
    usage = 0
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return (first or time.perf_counter()) - t0, time.perf_counter() - t0, usage


def via_grpc(stub: router_pb2_grpc.RouterServiceStub, key: str, tokens: int) -> tuple[float, float, int]:
    req = router_pb2.GenerateRequest(model=MODEL, prompt=PROMPT, max_tokens=tokens)
    req.sampling.temperature = 0
    t0 = time.perf_counter()
    first = None
    n = 0
    for msg in stub.Generate(req, metadata=(("authorization", f"Bearer {key}"),), timeout=120):
        if msg.text and first is None:
            first = time.perf_counter()
        if msg.HasField("usage"):
            n = msg.usage.completion_tokens
    return (first or time.perf_counter()) - t0, time.perf_counter() - t0, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--state-dir", type=Path, help="a running stack's state dir (default: start one)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/mesh_vs_triton.json"))
    args = parser.parse_args()

    with local_stack(args.state_dir, trace_exporter="file") as state:
        env = read_env(state / "local.env")
        settings = yaml.safe_load((state / "stack.yaml").read_text())
        triton_url = f"127.0.0.1:{settings['executor']['triton']['grpc_port']}"
        catalog = load_catalog(Path(settings["router"]["catalog"]))
        model = catalog.get(MODEL)
        assert model is not None
        bundle = TokenizerBundle.from_dir(model.tokenizer)
        params = GenerateParams(prompt_token_ids=bundle.encode(PROMPT), max_tokens=args.tokens, temperature=0.0,
                                stop_token_ids=list(bundle.stop_token_ids))
        client = openai.OpenAI(base_url=env["INFERPLANE_BASE_URL"], api_key=env["INFERPLANE_API_KEY"], max_retries=0)
        channel = grpc.insecure_channel(env["INFERPLANE_GRPC_ADDR"])
        stub = router_pb2_grpc.RouterServiceStub(channel)
        results: dict[str, list[tuple[float, float, int]]] = {"triton_direct": [], "mesh_grpc": [], "mesh_rest": []}
        # warm-up: one of each (torch's first call, connections)
        asyncio.run(direct_triton(triton_url, model.triton_model, params))
        via_grpc(stub, env["INFERPLANE_API_KEY"], args.tokens)
        via_rest(client, args.tokens)
        for i in range(args.runs):
            results["triton_direct"].append(asyncio.run(direct_triton(triton_url, model.triton_model, params)))
            results["mesh_grpc"].append(via_grpc(stub, env["INFERPLANE_API_KEY"], args.tokens))
            results["mesh_rest"].append(via_rest(client, args.tokens))
            print(f"  run {i + 1}/{args.runs} done", file=sys.stderr, flush=True)
        channel.close()

    summary = {name: summarize(s) for name, s in results.items()}
    base = summary["triton_direct"]
    print(f"\ngreedy completion, max_tokens={args.tokens}, {args.runs} runs each, medians "
          f"(tokens generated: {base['tokens']:.0f})")
    print(f"{'path':<15}{'TTFT ms':>10}{'total ms':>11}{'tokens/s':>11}{'TTFT x':>9}{'tok/s x':>9}")
    for name, s in summary.items():
        print(f"{name:<15}{s['ttft_ms_p50']:>10.2f}{s['total_ms_p50']:>11.1f}{s['tokens_per_s_p50']:>11.1f}"
              f"{s['ttft_ms_p50'] / base['ttft_ms_p50']:>9.2f}{s['tokens_per_s_p50'] / base['tokens_per_s_p50']:>9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tokens": args.tokens, "runs": args.runs, "summary": summary,
                                    "samples": results, "numpy": np.__version__}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
