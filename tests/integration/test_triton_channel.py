"""The step backend (``executor.triton_channel.TritonStepBackend``) on the LLM's channel mode, on a real tritonserver.

One tiny-llama model (``llm``, rendered by ``render_llm_model``); every test drives its sequences through one
backend, i.e. one ``ModelStreamInfer`` stream, and compares with the per-request contract (``TritonLLMClient``) on
the same server. ``RecordingSink`` counts frames as the executor's channel would flush them.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from inferplane.assets import TINY_LLAMA
from inferplane.common.errors import InvalidArgument, NotFound, Unavailable
from inferplane.executor.repository import render_llm_model
from inferplane.executor.triton_channel import TritonStepBackend
from inferplane.executor.triton_client import GenerateParams, TritonLLMClient
from inferplane.executor.triton_process import TritonProcess
from tests.channel_sink import RecordingSink
from tests.integration.triton_stack import metrics_page, running_triton

pytestmark = pytest.mark.triton

TEXTS = ["Create a new", "Return the number of", "If the value is not None,", "-" * 20,
         "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", ">>> x = 1\n>>> x = 2", "The optional argument", "Return a",
         "Set the", "Raise an error if", "Get the list of", "Check whether the"]
LONG = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"  # greedy keeps counting: a generation long enough to cancel


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    work = tmp_path_factory.mktemp("channel")
    render_llm_model("llm", TINY_LLAMA, work / "repo", torch_threads=1)
    with running_triton(work) as server:
        yield server


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(str(Path(TINY_LLAMA) / "tokenizer.json"))


def metric(server: TritonProcess, name: str, **labels: str) -> float:
    for line in metrics_page(server).splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def per_request(server: TritonProcess, params: GenerateParams) -> tuple[list[int], tuple[str | None, int, int]]:
    client = TritonLLMClient(server.grpc_url)
    try:
        chunks = [c async for c in client.generate("llm", params)]
    finally:
        await client.close()
    return [t for c in chunks for t in c.token_ids], (chunks[-1].finish_reason, chunks[-1].prompt_tokens,
                                                      chunks[-1].completion_tokens)


async def test_many_sequences_on_one_stream_equal_the_per_request_contract(triton: TritonProcess,
                                                                           tok: Tokenizer) -> None:
    params = [GenerateParams(tok.encode(t).ids, 16 + 2 * i) for i, t in enumerate(TEXTS)]
    expected = [await per_request(triton, p) for p in params]
    frames_before = metric(triton, "inferplane_llm_responses_total", model="llm", mode="channel")
    backend, sink = TritonStepBackend(triton.grpc_url), RecordingSink()
    try:
        for i, p in enumerate(params):
            backend.open(i, "llm", p, f"r{i}", sink)
        await sink.wait_ended(range(len(params)))
    finally:
        await backend.close()
    for i, (ids, (reason, prompt, completion)) in enumerate(expected):
        assert sink.tokens_of.get(i, []) == ids, f"sequence {i}"
        assert (sink.ended[i].reason, sink.ended[i].prompt_tokens, sink.ended[i].completion_tokens) == (
            reason, prompt, completion), f"sequence {i}"
    assert sink.after_end == []
    tokens = sum(len(v) for v in sink.tokens_of.values())
    print(f"\n{len(params)} sequences: {tokens} tokens in {sink.frames} frames, {sink.token_calls} token calls")
    assert sink.frames * 3 <= tokens, f"{sink.frames} frames for {tokens} tokens: frames do not carry several"
    # the hop counter: the model's own count of channel responses (published at most once a second)
    deadline = time.monotonic() + 5
    while (sent := metric(triton, "inferplane_llm_responses_total", model="llm", mode="channel") - frames_before) < 1:
        assert time.monotonic() < deadline, "inferplane_llm_responses_total{mode=channel} did not move"
        await asyncio.sleep(0.2)
    assert sent * 3 <= tokens


async def test_cancel_ends_one_sequence_and_the_others_go_on(triton: TritonProcess, tok: Tokenizer) -> None:
    prompt = tok.encode(LONG).ids
    others = [GenerateParams(tok.encode(t).ids, 40) for t in TEXTS[:3]]
    expected = [await per_request(triton, p) for p in others]
    backend, sink = TritonStepBackend(triton.grpc_url), RecordingSink()
    try:
        backend.open("victim", "llm", GenerateParams(prompt, 400), "v", sink)
        for i, p in enumerate(others):
            backend.open(i, "llm", p, f"o{i}", sink)
        await sink.wait_tokens("victim", 3)
        backend.cancel("victim")
        backend.cancel("never-opened")  # a no-op
        await sink.wait_ended(["victim", 0, 1, 2])
    finally:
        await backend.close()
    victim = sink.ended["victim"]
    assert victim.reason == "cancelled" and victim.error is None
    assert 3 <= victim.completion_tokens < 400 and victim.completion_tokens == len(sink.tokens_of["victim"])
    for i, (ids, (reason, _, completion)) in enumerate(expected):
        assert sink.tokens_of[i] == ids and (sink.ended[i].reason, sink.ended[i].completion_tokens) == (
            reason, completion)


async def test_a_refused_open_fails_only_its_sequence(triton: TritonProcess, tok: Tokenizer) -> None:
    good = GenerateParams(tok.encode(TEXTS[0]).ids, 8)
    backend, sink = TritonStepBackend(triton.grpc_url), RecordingSink()
    try:
        backend.open("a", "llm", good, "a", sink)
        backend.open("bad-top-p", "llm", GenerateParams([5, 6], 3, top_p=1.5), "b", sink)
        backend.open("empty", "llm", GenerateParams([], 3), "c", sink)
        backend.open("b", "llm", good, "d", sink)
        backend.open("nope", "no-such-model", good, "e", sink)
        await sink.wait_ended(["a", "bad-top-p", "empty", "b", "nope"])
    finally:
        await backend.close()
    assert isinstance(sink.ended["bad-top-p"].error, InvalidArgument)
    assert "top_p must be in" in str(sink.ended["bad-top-p"].error)
    assert isinstance(sink.ended["empty"].error, InvalidArgument)
    assert isinstance(sink.ended["nope"].error, NotFound)
    assert sink.ended["a"].reason == sink.ended["b"].reason == "length"
    assert sink.tokens_of["a"] == sink.tokens_of["b"] and len(sink.tokens_of["a"]) == 8


async def wait_slots_free(server: TritonProcess, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, "inferplane_llm_kv_slots_in_use", model="llm") != 0:
        assert time.monotonic() < deadline, "the model still holds the sequences' KV slots"
        await asyncio.sleep(0.02)


async def test_a_broken_stream_fails_its_sequences_and_the_next_open_reopens(triton: TritonProcess,
                                                                            tok: Tokenizer) -> None:
    prompt = tok.encode(LONG).ids
    backend, sink = TritonStepBackend(triton.grpc_url), RecordingSink()
    try:
        backend.open(1, "llm", GenerateParams(prompt, 400), "1", sink)
        backend.open(2, "llm", GenerateParams(prompt, 400), "2", sink)
        await sink.wait_tokens(1, 2)
        backend._streams["llm"].call.cancel()  # the gRPC stream breaks (as when the connection drops)
        await sink.wait_ended([1, 2], timeout=5)
        assert all(isinstance(sink.ended[k].error, Unavailable) for k in (1, 2)), sink.ended
        await wait_slots_free(triton)  # the model saw its attach cancelled and cancelled both
        backend.open(3, "llm", GenerateParams(tok.encode(TEXTS[0]).ids, 4), "3", sink)  # a new stream
        await sink.wait_ended([3])
        assert sink.ended[3].reason == "length" and len(sink.tokens_of[3]) == 4
    finally:
        await backend.close()
    assert sink.after_end == []


async def test_close_fails_live_sequences_with_unavailable(triton: TritonProcess, tok: Tokenizer) -> None:
    prompt = tok.encode(LONG).ids
    backend, sink = TritonStepBackend(triton.grpc_url), RecordingSink()
    for key in range(3):
        backend.open(key, "llm", GenerateParams(prompt, 400), str(key), sink)
    await sink.wait_tokens(0, 2)
    await backend.close()
    assert set(sink.ended) == {0, 1, 2}
    assert all(isinstance(e.error, Unavailable) for e in sink.ended.values())
    await wait_slots_free(triton)
    after = RecordingSink()
    backend.open("late", "llm", GenerateParams(prompt, 4), "late", after)
    await after.wait_ended(["late"], timeout=5)
    assert isinstance(after.ended["late"].error, Unavailable)
    assert re.search(r"closed", str(after.ended["late"].error))


async def test_an_open_for_a_channel_the_instance_does_not_hold_fails_only_that_sequence(
        triton: TritonProcess, tok: Tokenizer) -> None:
    # What an open would meet on a second instance of the model: the open request's own TritonError (UNAVAILABLE,
    # "unknown channel"), which arrives as an error message on the shared stream naming the open.
    from inferplane.executor import triton_channel

    good = GenerateParams(tok.encode(TEXTS[0]).ids, 6)
    backend, sink = TritonStepBackend(triton.grpc_url), RecordingSink()
    try:
        backend.open("a", "llm", good, "a", sink)
        await sink.wait_ended(["a"])
        stream = backend._streams["llm"]
        real = stream._channel_raw
        stream._channel_raw = triton_channel._bytes_tensor(["not-attached-here"])
        backend.open("stray", "llm", good, "s", sink)
        stream._channel_raw = real
        backend.open("b", "llm", good, "b", sink)
        await sink.wait_ended(["stray", "b"])
        assert backend._streams.get("llm") is stream, "the stream survived"
    finally:
        await backend.close()
    assert isinstance(sink.ended["stray"].error, Unavailable)
    assert "unknown channel" in str(sink.ended["stray"].error)
    assert sink.ended["b"].reason == "length" and sink.tokens_of["b"] == sink.tokens_of["a"]


async def test_a_stream_is_retired_after_its_share_of_sequences_and_none_is_lost(triton: TritonProcess,
                                                                                 tok: Tokenizer) -> None:
    """Recycling (tritonserver keeps memory per request of a stream until the stream ends): a stream takes
    ``sequences_per_stream`` opens, the next open starts another, the old one ends with its last sequence."""
    backend, sink = TritonStepBackend(triton.grpc_url, sequences_per_stream=4), RecordingSink()
    params = GenerateParams(tok.encode(TEXTS[0]).ids, 6)
    try:
        for wave in range(3):  # 3 waves of 5 concurrent sequences: every wave crosses a stream's share
            keys = range(wave * 5, wave * 5 + 5)
            for i in keys:
                backend.open(i, "llm", params, f"r{i}", sink)
            await sink.wait_ended(keys)
        assert backend.streams_opened >= 4, backend.streams_opened
        assert len(backend._streams) == 1  # the retired streams are gone once their sequences ended
        await wait_slots_free(triton)
    finally:
        await backend.close()
    assert all(sink.ended[i].reason == "length" and sink.ended[i].completion_tokens == 6 for i in range(15))
    assert len({tuple(sink.tokens_of[i]) for i in range(15)}) == 1  # greedy: the same tokens on every stream
    assert sink.after_end == []
