"""The benchmarks' fast model (``bench/fast_model``, "fast-sim") on a real tritonserver, through the executor's client.

It is a benchmark instrument, not a model; this keeps it honest to the LLM's contract so that
``bench.mesh_ceiling`` measures the mesh and not a broken stand-in: max_tokens, the final response's counts,
stop ids, the rate, cancellation, a refused request. Rendered from ``bench/fast_model/catalog.yaml`` by the
executor's renderer (catalog ``triton_template``), as the benchmark's stack renders it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferplane.common.catalog import load_catalog
from inferplane.common.errors import InvalidArgument
from inferplane.executor.repository import render_repository
from inferplane.executor.triton_client import GenerateParams, TritonChunk, TritonLLMClient
from inferplane.executor.triton_process import TritonProcess, prepare_backend_dir

pytestmark = pytest.mark.triton

CATALOG = Path(__file__).resolve().parents[2] / "bench" / "fast_model" / "catalog.yaml"
RATE = 200.0  # tokens/s per sequence, set below: 5 ms steps keep the test short


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    work = tmp_path_factory.mktemp("fast")
    catalog = load_catalog(CATALOG)
    model = catalog.get("fast-sim")
    assert model is not None
    model.triton_parameters = {"tokens_per_s": str(RATE), "first_token_ms": "10"}
    assert render_repository(catalog, work / "repo") == ["fast-sim"]
    config = (work / "repo" / "fast-sim" / "config.pbtxt").read_text()
    assert "decoupled: true" in config and 'key: "tokens_per_s"' in config
    server = TritonProcess(work / "repo", backend_dir=prepare_backend_dir(work / "cache"), log_path=work / "log")
    server.start()
    try:
        server.wait_ready(timeout=120)
        yield server
    finally:
        server.stop()


async def generate(server: TritonProcess, params: GenerateParams, stop_after: int | None = None) -> list[TritonChunk]:
    client = TritonLLMClient(server.grpc_url)
    chunks = []
    try:
        async for chunk in client.generate("fast-sim", params):
            chunks.append(chunk)
            if stop_after is not None and sum(len(c.token_ids) for c in chunks) >= stop_after:
                break
    finally:
        await client.close()
    return chunks


def test_honours_max_tokens_and_ends_with_the_counts(triton: TritonProcess) -> None:
    t0 = time.monotonic()
    chunks = asyncio.run(generate(triton, GenerateParams([5, 6, 7], 40)))
    elapsed = time.monotonic() - t0
    tokens = [t for c in chunks[:-1] for t in c.token_ids]
    assert len(tokens) == 40 and all(c.token_ids for c in chunks[:-1]), "every token response carries tokens"
    final = chunks[-1]
    assert (final.token_ids, final.finish_reason, final.prompt_tokens, final.completion_tokens) == (
        [], "length", 3, 40)
    assert all(512 <= t < 4096 and t != 1 for t in tokens), "ids from the vocabulary, never eos"
    assert elapsed >= 39 / RATE, f"40 tokens at {RATE:g}/s came in {elapsed:.3f}s: the rate is not held"
    again = asyncio.run(generate(triton, GenerateParams([5, 6, 7], 40)))
    assert [t for c in again[:-1] for t in c.token_ids] == tokens, "deterministic"


def test_a_stop_id_ends_the_stream_and_counts(triton: TritonProcess) -> None:
    first = asyncio.run(generate(triton, GenerateParams([9], 10)))
    tokens = [t for c in first[:-1] for t in c.token_ids]
    chunks = asyncio.run(generate(triton, GenerateParams([9], 10, stop_token_ids=[tokens[4]])))
    assert [t for c in chunks[:-1] for t in c.token_ids] == tokens[:4]
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("stop", 5)


def test_many_streams_and_a_cancelled_one(triton: TritonProcess) -> None:
    async def run() -> list[list[TritonChunk]]:
        return await asyncio.gather(*[generate(triton, GenerateParams([1 + i], 20)) for i in range(64)],
                                    generate(triton, GenerateParams([3], 10_000), stop_after=5))

    results = asyncio.run(run())
    assert all(r[-1].completion_tokens == 20 and r[-1].finish_reason == "length" for r in results[:64])
    assert results[64][-1].finish_reason is None  # left after 5 tokens: the client cancelled the call
    deadline = time.monotonic() + 5
    while not re.search(r"\[fast-sim\] cancelled after \d+ tokens", triton.log_tail()):
        assert time.monotonic() < deadline, "the model did not notice the cancellation"
        time.sleep(0.05)


def test_a_bad_request_is_refused(triton: TritonProcess) -> None:
    with pytest.raises(InvalidArgument):
        asyncio.run(generate(triton, GenerateParams([], 4)))
