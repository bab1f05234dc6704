"""The benchmarks' fast model (``bench/fast_model``, "fast-sim") on a real tritonserver, through the executor's client.

It is a benchmark instrument, not a model; this keeps it honest to the LLM's contract so that
``bench.mesh_ceiling`` measures the mesh and not a broken stand-in: max_tokens, the final response's counts,
stop ids, the rate, cancellation, a refused request. Rendered from ``bench/fast_model/catalog.yaml`` by the
executor's renderer (catalog ``triton_template``), as the benchmark's stack renders it. It speaks the channel (step)
mode too, through the executor's ``TritonStepBackend``: the same tokens, many sequences per frame; a copy with two
instances ("fast-sim-2") is refused the step path.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferplane.common.catalog import load_catalog
from inferplane.common.errors import InvalidArgument, Unavailable
from inferplane.executor.repository import render_llm_model, render_repository
from inferplane.executor.triton_channel import TritonStepBackend
from inferplane.executor.triton_client import GenerateParams, TritonChunk, TritonLLMClient
from inferplane.executor.triton_process import TritonProcess
from tests.channel_sink import PerRequestBackend, RecordingSink
from tests.integration.triton_stack import running_triton

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
    # the same model with two instances, as a deployment might configure it: not for the step backend
    assert model.checkpoint is not None and model.triton_template is not None
    two = render_llm_model("fast-sim-2", model.checkpoint, work / "repo", template=model.triton_template,
                           extra=model.triton_parameters, max_context=model.context_length)
    (two / "config.pbtxt").write_text(config.replace('"fast-sim"', '"fast-sim-2"').replace("count: 1", "count: 2"))
    with running_triton(work, ready_timeout_s=120) as server:
        yield server


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


def test_channel_mode_gives_the_same_tokens_in_frames_of_many_sequences(triton: TritonProcess) -> None:
    params = [GenerateParams(list(range(1, 2 + i % 5)), 20 + i % 5) for i in range(32)]
    expected = [asyncio.run(generate(triton, p)) for p in params[:5]]

    async def run() -> RecordingSink:
        backend, sink = TritonStepBackend(triton.grpc_url), RecordingSink()
        try:
            for i, p in enumerate(params):
                backend.open(i, "fast-sim", p, str(i), sink)
            await sink.wait_ended(range(len(params)), timeout=30)
        finally:
            await backend.close()
        return sink

    sink = asyncio.run(run())
    for i in range(len(params)):
        chunks = expected[i % 5]  # params repeat every 5
        assert sink.tokens_of[i] == [t for c in chunks for t in c.token_ids], f"sequence {i}"
        final = chunks[-1]
        assert (sink.ended[i].reason, sink.ended[i].prompt_tokens, sink.ended[i].completion_tokens) == (
            final.finish_reason, final.prompt_tokens, final.completion_tokens)
    assert sink.after_end == []
    tokens = sum(map(len, sink.tokens_of.values()))
    print(f"\nfast-sim, 32 sequences: {tokens} tokens in {sink.frames} frames")
    assert sink.frames * 8 <= tokens, f"{sink.frames} frames for {tokens} tokens"


def test_channel_mode_cancel_stop_and_refusal(triton: TritonProcess) -> None:
    async def run() -> RecordingSink:
        backend, sink = TritonStepBackend(triton.grpc_url), RecordingSink()
        try:
            backend.open("long", "fast-sim", GenerateParams([3], 10_000), "l", sink)
            backend.open("short", "fast-sim", GenerateParams([9], 10), "s", sink)
            backend.open("bad", "fast-sim", GenerateParams([], 4), "b", sink)
            await sink.wait_ended(["short", "bad"])
            stop = sink.tokens_of["short"][4]
            backend.open("stopped", "fast-sim", GenerateParams([9], 10, stop_token_ids=[stop]), "t", sink)
            await sink.wait_tokens("long", 5)
            backend.cancel("long")
            await sink.wait_ended(["long", "stopped"])
        finally:
            await backend.close()
        return sink

    sink = asyncio.run(run())
    assert sink.ended["long"].reason == "cancelled" and sink.ended["long"].completion_tokens >= 5
    assert isinstance(sink.ended["bad"].error, InvalidArgument)
    assert (sink.ended["stopped"].reason, sink.ended["stopped"].completion_tokens) == ("stop", 5)
    assert sink.tokens_of["stopped"] == sink.tokens_of["short"][:4]


def test_a_model_with_two_instances_is_not_served_on_the_step_path(triton: TritonProcess) -> None:
    # Triton could route an open to the instance that does not hold its channel: without a per-request fallback
    # backend its sequences fail with Unavailable, and the backend remembers the model is not for the step path.
    async def run() -> tuple[RecordingSink, dict[str, bool]]:
        backend, sink = TritonStepBackend(triton.grpc_url), RecordingSink()
        try:
            backend.open("one", "fast-sim-2", GenerateParams([3], 4), "1", sink)
            backend.open("single", "fast-sim", GenerateParams([3], 4), "2", sink)
            await sink.wait_ended(["one", "single"])
        finally:
            await backend.close()
        return sink, backend._step_models

    sink, modes = asyncio.run(run())
    assert modes == {"fast-sim-2": False, "fast-sim": True}
    assert isinstance(sink.ended["one"].error, Unavailable) and "single-instance" in str(sink.ended["one"].error)
    assert sink.ended["single"].reason == "length"


def test_a_model_with_two_instances_goes_to_the_fallback_backend(triton: TritonProcess) -> None:
    async def run() -> tuple[RecordingSink, PerRequestBackend]:
        fallback = PerRequestBackend(triton.grpc_url)
        backend, sink = TritonStepBackend(triton.grpc_url, fallback=fallback), RecordingSink()
        try:
            backend.open("first", "fast-sim-2", GenerateParams([3], 6), "1", sink)  # while the model is probed
            await sink.wait_ended(["first"])
            backend.open("long", "fast-sim-2", GenerateParams([3], 10_000), "2", sink)  # known: straight there
            await sink.wait_tokens("long", 3)
            backend.cancel("long")
            await sink.wait_ended(["long"])
        finally:
            await backend.close()
            await fallback.close()
        return sink, fallback

    sink, fallback = asyncio.run(run())
    assert fallback.opened == ["first", "long"]
    assert (sink.ended["first"].reason, sink.ended["first"].completion_tokens) == ("length", 6)
    assert sink.ended["long"].reason == "cancelled" and len(sink.tokens_of["long"]) >= 3
