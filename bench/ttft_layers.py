"""Where a request's time to first token goes, layer by layer, one request at a time (issue 13, issue 16).

    python -m bench.ttft_layers [--requests 30] [--prompt-tokens 8] [--rounds 2] [--state-dir DIR]

On a stack as ``inferplane up`` starts it (one executor; or the one ``inferplane up --state-dir DIR`` runs), the
same kind of request (a fresh ``--prompt-tokens``-token prompt, 8 tokens asked, ``ignore_eos``) is sent one at a
time at each layer, from the inside out:

- ``triton``: straight into Triton's per-request contract (the executor's own ``TritonLLMClient``);
- ``triton step``: Triton's step stream (the executor's ``TritonStepBackend``, one stream for all);
- ``executor``: the executor's ``Channel`` (the router's ``ExecutorChannel`` client, token ids in);
- ``router``: the router's gRPC ``Generate`` (text in: tokenization, admission, routing, detokenization);
- ``envoy``: the same through Envoy's public port.

Each layer's TTFT p50 and the difference to the layer inside it: what that hop adds per request. ``--rounds``
repeats the whole sequence (the machine's drift shows). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml
from tokenizers import Tokenizer

from bench._stack import local_stack, progress
from inferplane.assets import CATALOG
from inferplane.cli.launcher import read_env
from inferplane.common.errors import InferplaneError
from inferplane.executor.triton_channel import TritonStepBackend
from inferplane.executor.triton_client import GenerateParams, TritonLLMClient
from inferplane.router.channel import ExecutorChannel
from inferplane.v1 import executor_pb2, router_pb2, router_pb2_grpc

MODEL = "tiny-llama"
MAX_TOKENS = 8
WORDS = ("return the path of a file list joined with value string object if is not given default name new each "
         "in order to be").split()


class FirstToken:
    """A ``SequenceSink`` that notes the first token and the end."""

    def __init__(self) -> None:
        self.first, self.done = asyncio.Event(), asyncio.Event()

    def tokens(self, key: Hashable, token_ids: Sequence[int], *_: object) -> None:
        self.first.set()

    def finished(self, key: Hashable, *_: object) -> None:
        self.done.set()

    def failed(self, key: Hashable, error: InferplaneError) -> None:
        progress(f"  failed: {error}")
        self.first.set()
        self.done.set()


async def timed(requests: list[list[int]], one: Callable[[int, list[int]], Awaitable[float]]) -> list[float]:
    out = []
    for i, ids in enumerate(requests):
        out.append(await one(i, ids))
        await asyncio.sleep(0.02)  # one at a time, with a breath between
    return out


def params(ids: list[int]) -> GenerateParams:
    return GenerateParams(prompt_token_ids=ids, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


async def triton(url: str, requests: list[list[int]]) -> list[float]:
    client = TritonLLMClient(url)

    async def one(i: int, ids: list[int]) -> float:
        started, first = time.perf_counter(), 0.0
        async for chunk in client.generate(MODEL, params(ids)):
            if not first and chunk.token_ids:
                first = time.perf_counter() - started
        return first

    try:
        return await timed(requests, one)
    finally:
        await client.close()


async def triton_step(url: str, requests: list[list[int]]) -> list[float]:
    backend = TritonStepBackend(url)

    async def one(i: int, ids: list[int]) -> float:
        sink, started = FirstToken(), time.perf_counter()
        backend.open(i, MODEL, params(ids), str(i), sink)
        await sink.first.wait()
        first = time.perf_counter() - started
        await sink.done.wait()
        return first

    try:
        return await timed(requests, one)
    finally:
        await backend.close()


async def executor(address: str, requests: list[list[int]]) -> list[float]:
    channel = ExecutorChannel(address, grpc.aio.insecure_channel(address))

    async def one(i: int, ids: list[int]) -> float:
        request = executor_pb2.ExecutorGenerateRequest(model=MODEL, request_id=f"ttft-{i}", prompt_token_ids=ids,
                                                       max_tokens=MAX_TOKENS)
        request.sampling.temperature, request.sampling.ignore_eos = 0.0, True
        started = time.perf_counter()
        sequence = await channel.open(request, timeout=60)  # returns at the sequence's first event: its tokens
        first = time.perf_counter() - started
        async for _ in sequence:
            pass
        return first

    try:
        return await timed(requests, one)
    finally:
        await channel.close()


async def router(address: str, key: str, requests: list[list[int]], tokenizer: Tokenizer) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)

        async def one(i: int, ids: list[int]) -> float:
            request = router_pb2.GenerateRequest(model=MODEL, prompt=tokenizer.decode(ids), max_tokens=MAX_TOKENS)
            request.sampling.temperature, request.sampling.ignore_eos = 0.0, True
            started, first = time.perf_counter(), 0.0
            async for msg in stub.Generate(request, metadata=[("authorization", f"Bearer {key}")], timeout=60):
                if not first and msg.token_count:
                    first = time.perf_counter() - started
            return first

        return await timed(requests, one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--state-dir", type=Path)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(str(CATALOG.parent / "models" / MODEL / "tokenizer.json"))
    rng = random.Random(13)

    def prompts() -> list[list[int]]:
        out = []
        for _ in range(args.requests):
            text = " ".join(rng.choice(WORDS) for _ in range(args.prompt_tokens * 2))
            out.append(tokenizer.encode(text).ids[:args.prompt_tokens])
        return out

    with local_stack(args.state_dir, executors=1) as state:
        env = read_env(state / "local.env")
        stack = yaml.safe_load((state / "stack.yaml").read_text())

        def address(section: str) -> str:
            server = stack[section]["server"]
            return f"{server['host']}:{server['port']}"

        triton_url = f"127.0.0.1:{stack['executor']['triton']['grpc_port']}"
        key = env["INFERPLANE_API_KEY"]
        layers: list[tuple[str, Callable[[list[list[int]]], Coroutine[Any, Any, list[float]]]]] = [
            ("triton", lambda r: triton(triton_url, r)),
            ("triton step", lambda r: triton_step(triton_url, r)),
            ("executor", lambda r: executor(address("executor"), r)),
            ("router", lambda r: router(address("router"), key, r, tokenizer)),
            ("envoy", lambda r: router(env["INFERPLANE_GRPC_ADDR"], key, r, tokenizer)),
        ]
        print(f"\nTTFT, one request at a time: {args.requests} requests a layer, {args.prompt_tokens}-token prompts, "
              f"{MAX_TOKENS} tokens asked")

        async def measure() -> None:  # one event loop for every layer (grpc.aio binds its poller to the first)
            await router(address("router"), key, prompts()[:5], tokenizer)  # warm-up
            for round_ in range(1, args.rounds + 1):
                inner = None
                for name, run in layers:
                    p50 = statistics.median(await run(prompts())) * 1000
                    added = f"+{p50 - inner:5.2f} ms" if inner is not None else ""
                    print(f"round {round_}  {name:<12} p50 {p50:6.2f} ms  {added}", flush=True)
                    inner = p50

        asyncio.run(measure())

if __name__ == "__main__":
    main()
