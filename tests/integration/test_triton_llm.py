"""The decoupled ``llm`` Triton model on a real tritonserver, driven through ``tritonclient.grpc.aio``.

The server serves two copies rendered by ``render_llm_model`` with models/tiny-llama: ``llm`` (the
checkpoint's full context, 32 sequences batched together) and ``llm_ctx`` (max_context 32, to reach the
context end quickly, and max_sequences 1, so that concurrent requests queue). Each version folder carries its
own copy of ``inferplane.modeling``, which the model loads. ``llm_prefix`` has a prefix cache of 32 blocks of 8
tokens.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from tokenizers import Tokenizer
from tritonclient.grpc import InferInput

from inferplane.assets import TINY_LLAMA as ASSET_TINY_LLAMA
from inferplane.common.errors import InvalidArgument, NotFound
from inferplane.executor.repository import render_llm_model
from inferplane.executor.triton_client import GenerateParams, TritonLLMClient
from inferplane.executor.triton_process import TritonProcess
from inferplane.modeling.llama import LlamaForCausalLM, generate, load_model
from tests.integration.triton_stack import metrics_page, running_triton

pytestmark = pytest.mark.triton

TINY_LLAMA = ASSET_TINY_LLAMA
SHORT_CONTEXT = 32
PROMPT = "Create a new"  # greedy: ~25 tokens of docstring before </s>


def render_model(repo: Path, name: str, *, max_context: int, max_sequences: int = 32,
                 extra: dict[str, str] | None = None) -> None:
    render_llm_model(name, TINY_LLAMA, repo, torch_threads=1, max_context=max_context, max_sequences=max_sequences,
                     extra=extra)


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    work = tmp_path_factory.mktemp("triton")
    render_model(work / "repo", "llm", max_context=0)
    render_model(work / "repo", "llm_ctx", max_context=SHORT_CONTEXT, max_sequences=1)
    render_model(work / "repo", "llm_prefix", max_context=0, max_sequences=4,
                 extra={"prefix_cache_blocks": "32", "prefix_block_size": "8"})
    with running_triton(work) as server:
        assert server.proc is not None
        group = server.proc.pid  # start_new_session: the server leads its own process group
        yield server
    with pytest.raises(ProcessLookupError):  # nothing of the group (server, stubs) is left
        os.killpg(group, 0)


@pytest.fixture(scope="module")
def reference() -> tuple[LlamaForCausalLM, Tokenizer, frozenset[int]]:
    tok = Tokenizer.from_file(str(TINY_LLAMA / "tokenizer.json"))
    eos = frozenset({tok.token_to_id("</s>"), tok.token_to_id("<|end|>")})
    return load_model(TINY_LLAMA, progress=None), tok, eos


@pytest.fixture(autouse=True, scope="module")
def empty_final_response() -> Iterator[None]:
    """Ask for ``triton_final_response`` on every response.

    The aio client's ``stream_infer`` has no ``enable_empty_final_response`` switch (the sync client's
    ``async_stream_infer`` has) and refuses ``triton_*`` request parameters, so the request it builds
    gets the flag here.
    """
    build = grpcclient._get_inference_request

    def with_flag(**kwargs: Any) -> Any:
        request = build(**kwargs)
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        return request

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grpcclient, "_get_inference_request", with_flag)
        yield


def tensor(name: str, values: list[int] | list[float], dtype: str) -> InferInput:
    arr = np.asarray(values, dtype={"INT64": np.int64, "INT32": np.int32, "FP32": np.float32}[dtype])
    t = InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def request_inputs(input_ids: list[int], max_tokens: int, **optional: Any) -> list[InferInput]:
    inputs = [tensor("input_ids", input_ids, "INT64"), tensor("max_tokens", [max_tokens], "INT32")]
    types = {"temperature": "FP32", "top_p": "FP32", "top_k": "INT32", "seed": "INT64", "stop_token_ids": "INT64"}
    for name, value in optional.items():
        inputs.append(tensor(name, value if isinstance(value, list) else [value], types[name]))
    return inputs


@dataclass
class Streamed:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finals: list[bool] = field(default_factory=list)  # triton_final_response of every response
    final: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # tokens per token response


async def one_request(inputs: list[InferInput], model: str) -> AsyncIterator[dict[str, Any]]:
    yield {"model_name": model, "inputs": inputs}


async def stream(
    server: TritonProcess, inputs: list[InferInput], *, model: str = "llm", cancel_after: int | None = None,
) -> Streamed:
    """Send one request on a fresh stream and collect its responses until the stream ends."""
    out = Streamed()
    async with grpcclient.InferenceServerClient(server.grpc_url) as client:
        responses = client.stream_infer(one_request(inputs, model))
        async for result, error in responses:
            if error is not None:
                out.errors.append(str(error))
                continue
            out.finals.append(result.get_response().parameters["triton_final_response"].bool_param)
            ids = result.as_numpy("token_ids")
            if out.finals[-1]:
                assert ids is not None and ids.size == 0, "the final response carries no token"
                out.final = {k: result.as_numpy(k)[0] for k in ("finish_reason", "prompt_tokens", "completion_tokens")}
                out.final["finish_reason"] = out.final["finish_reason"].decode()
                break
            assert ids is not None and ids.size >= 1, "a token response carries at least one token"
            out.tokens += ids.tolist()
            out.logprobs += result.as_numpy("logprobs").tolist()
            out.sizes.append(int(ids.size))
            if cancel_after is not None and len(out.tokens) >= cancel_after:
                responses.cancel()
                break
    return out


def reference_run(ref: tuple[LlamaForCausalLM, Tokenizer, frozenset[int]], prompt: list[int], **kw: Any) -> Any:
    model, _, eos = ref
    stop = eos | frozenset(kw.pop("stop_ids", ()))
    gen = generate(model, prompt, stop_ids=stop, **kw)
    steps = list(gen)
    return [s.token_id for s in steps], [s.logprob for s in steps], gen


async def test_stream_equals_in_process_greedy(triton: TritonProcess, reference: Any) -> None:
    prompt = reference[1].encode(PROMPT).ids
    ref_ids, ref_logprobs, gen = reference_run(reference, prompt, max_tokens=32)
    got = await stream(triton, request_inputs(prompt, 32))
    assert got.errors == []
    assert got.tokens == ref_ids
    np.testing.assert_allclose(got.logprobs, ref_logprobs, atol=1e-4)
    assert got.finals == [False] * len(got.sizes) + [True]
    assert got.final == {"finish_reason": gen.finish_reason, "prompt_tokens": len(prompt),
                         "completion_tokens": gen.completion_tokens}


async def test_max_tokens_is_honoured(triton: TritonProcess, reference: Any) -> None:
    prompt = reference[1].encode(PROMPT).ids
    ref_ids, _, gen = reference_run(reference, prompt, max_tokens=5)
    assert gen.finish_reason == "length", "precondition: no eos in the first 5 greedy tokens"
    got = await stream(triton, request_inputs(prompt, 5))
    assert got.tokens == ref_ids and len(got.tokens) == 5
    assert got.final == {"finish_reason": "length", "prompt_tokens": len(prompt), "completion_tokens": 5}


async def test_stop_token_ids_are_honoured(triton: TritonProcess, reference: Any) -> None:
    prompt = reference[1].encode(PROMPT).ids
    free, _, gen = reference_run(reference, prompt, max_tokens=20)
    assert gen.finish_reason == "length", "precondition: no eos in the first 20 greedy tokens"
    stop = free[4]
    got = await stream(triton, request_inputs(prompt, 20, stop_token_ids=[stop, 4095]))
    assert got.tokens == free[: free.index(stop)]
    assert got.final["finish_reason"] == "stop"
    assert got.final["completion_tokens"] == free.index(stop) + 1  # the stop token is counted, not sent


async def test_context_end_finishes_with_length(triton: TritonProcess, reference: Any) -> None:
    # A number list keeps the greedy model going, so it is the context end that stops it.
    numbers = ", ".join(str(i) for i in range(1, 40))
    prompt_ids = reference[1].encode(numbers).ids[: SHORT_CONTEXT - 4]
    ref_ids, _, gen = reference_run(reference, prompt_ids, max_tokens=100, max_context=SHORT_CONTEXT)
    assert gen.finish_reason == "length" and len(ref_ids) == 4, "precondition: no eos before the context end"
    got = await stream(triton, request_inputs(prompt_ids, 100), model="llm_ctx")
    assert got.tokens == ref_ids
    assert got.final == {"finish_reason": "length", "prompt_tokens": SHORT_CONTEXT - 4, "completion_tokens": 4}


async def test_seeded_sampling_is_reproducible_through_triton(triton: TritonProcess, reference: Any) -> None:
    prompt = reference[1].encode(PROMPT).ids
    runs = [await stream(triton, request_inputs(prompt, 16, temperature=0.9, top_p=0.9, top_k=40, seed=s))
            for s in (11, 11, 12)]
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].tokens != runs[2].tokens
    assert all(r.final["completion_tokens"] >= len(r.tokens) for r in runs)


@pytest.mark.parametrize(
    ("inputs", "model", "message"),
    [
        (lambda: request_inputs([], 5), "llm", "input_ids must not be empty"),
        (lambda: request_inputs([5, 6], 0), "llm", "max_tokens must be >= 1"),
        (lambda: request_inputs(list(range(10, 10 + SHORT_CONTEXT)), 1), "llm_ctx", "does not fit the context"),
        (lambda: request_inputs([5, 6], 3, top_p=0.0), "llm", "top_p must be in"),
        (lambda: request_inputs([5, 6], 3, top_p=1.5), "llm", "top_p must be in"),
        (lambda: request_inputs([5, 6], 3, temperature=-1.0), "llm", "temperature must be >= 0"),
    ],
    ids=["empty", "max_tokens", "too_long", "top_p_0", "top_p_big", "negative_temperature"],
)
async def test_bad_requests_get_one_error(triton: TritonProcess, inputs: Any, model: str, message: str) -> None:
    got = await stream(triton, inputs(), model=model)
    assert len(got.errors) == 1 and message in got.errors[0], got.errors
    assert got.tokens == [] and got.final == {}


async def test_refusals_end_the_executors_stream_with_their_status_code(triton: TritonProcess) -> None:
    # the executor's client opens its streams with contract.STREAM_ERRORS_AS_STATUS: INVALID_ARG arrives as
    # the gRPC status INVALID_ARGUMENT, an unknown model as NOT_FOUND (through ModelMetadata)
    client = TritonLLMClient(triton.grpc_url)
    try:
        for model, params, message in [("llm", GenerateParams([5, 6], 3, top_p=1.5), "top_p must be in"),
                                       ("llm_ctx", GenerateParams(list(range(10, 10 + SHORT_CONTEXT)), 1),
                                        "does not fit the context")]:
            with pytest.raises(InvalidArgument, match=re.escape(message)):
                _ = [c async for c in client.generate(model, params)]
        with pytest.raises(NotFound):
            _ = [c async for c in client.generate("nope", GenerateParams([5, 6], 3))]
        chunks = [c async for c in client.generate("llm", GenerateParams([5, 6], 3))]  # still serving
        assert chunks[-1].finish_reason is not None
    finally:
        await client.close()


async def test_cancel_stops_the_model_and_next_request_works(triton: TritonProcess, reference: Any) -> None:
    # The model usually ends a docstring within ~100 tokens; number lists and rulers make it loop instead.
    tok = reference[1]
    max_tokens = 300
    candidates = ["1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "-" * 20, ">>> x = 1\n>>> x = 2\n>>> x = 3\n>>>"]
    for text in candidates:
        prompt = tok.encode(text).ids
        _, _, gen = reference_run(reference, prompt, max_tokens=max_tokens)
        if gen.finish_reason == "length":
            break
    else:
        pytest.fail("precondition: none of the prompts gives a long greedy generation to cancel")
    log_mark = len(triton.log_tail(10**9))

    got = await stream(triton, request_inputs(prompt, max_tokens), cancel_after=3)
    assert 3 <= len(got.tokens) <= 3 + max(got.sizes) and got.final == {}  # a response may carry several

    deadline = time.monotonic() + 30
    while not (m := re.search(r"finish=cancelled .*completion_tokens=(\d+)", triton.log_tail(10**9)[log_mark:])):
        assert time.monotonic() < deadline, f"the model did not report a cancel:\n{triton.log_tail()}"
        await asyncio.sleep(0.1)
    assert 3 <= int(m.group(1)) < gen.completion_tokens

    started = time.monotonic()
    after = await stream(triton, request_inputs(reference[1].encode(PROMPT).ids, 5))
    assert len(after.tokens) == 5 and after.final["finish_reason"] == "length"
    assert time.monotonic() - started < 10



def gauges(server: TritonProcess, model: str) -> dict[str, float]:
    """The scheduler's custom metrics of ``model`` on Triton's metrics endpoint."""
    found = re.findall(rf'^inferplane_llm_(\w+){{model="{model}"}} (\S+)$', metrics_page(server), re.M)
    return {name: float(value) for name, value in found}


async def wait_for_gauge(server: TritonProcess, model: str, name: str, value: float, timeout: float = 10) -> float:
    """Poll until the gauge reads ``value``; returns the seconds it took."""
    started = time.monotonic()
    while gauges(server, model).get(name) != value:
        assert time.monotonic() - started < timeout, f"{name} never read {value}: {gauges(server, model)}"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def test_concurrent_streams_equal_alone(triton: TritonProcess, reference: Any) -> None:
    # 8 greedy streams of mixed prompts and lengths plus 2 seeded sampled ones, all in flight at once:
    # each gets what it gets alone (greedy: the in-process single-sequence generate()).
    tok = reference[1]
    texts = ["Create a new", "Return the number of", "If the value is not None,", "-" * 20,
             "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", ">>> x = 1\n>>> x = 2", "The optional argument", "Return a"]
    prompts = [tok.encode(t).ids for t in texts]
    greedy = [request_inputs(p, 20 + 5 * i) for i, p in enumerate(prompts)]
    sampled = [request_inputs(prompts[0], 24, temperature=0.9, top_k=40, seed=s) for s in (5, 6)]
    alone = [await stream(triton, inputs) for inputs in sampled]
    together = await asyncio.gather(*(stream(triton, inputs) for inputs in greedy + sampled))
    for i, (prompt, got) in enumerate(zip(prompts, together[:8], strict=True)):
        ref_ids, ref_logprobs, gen = reference_run(reference, prompt, max_tokens=20 + 5 * i)
        assert got.errors == [] and got.tokens == ref_ids, f"stream {i}"
        np.testing.assert_allclose(got.logprobs, ref_logprobs, atol=1e-4)
        assert got.final["completion_tokens"] == gen.completion_tokens
    assert [g.tokens for g in together[8:]] == [a.tokens for a in alone]


async def test_metrics_show_slots_and_a_cancel_frees_its_slot(triton: TritonProcess, reference: Any) -> None:
    await wait_for_gauge(triton, "llm", "kv_slots_in_use", 0)  # earlier tests' streams have all ended
    assert gauges(triton, "llm") == {"active_sequences": 0, "queued_requests": 0, "kv_slots_in_use": 0,
                                     "kv_slots_total": 32, "prefix_cache_blocks_used": 0,
                                     "prefix_cache_blocks_total": 0}  # this model has no prefix cache
    assert gauges(triton, "llm_ctx")["kv_slots_total"] == 1
    prompt = reference[1].encode("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,").ids
    async with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        responses = client.stream_infer(one_request(request_inputs(prompt, 400, temperature=1.0, seed=3), "llm"))
        got = 0
        async for result, error in responses:
            assert error is None
            got += int(result.as_numpy("token_ids").size)
            if got >= 3:
                break
        await wait_for_gauge(triton, "llm", "kv_slots_in_use", 1)
        assert gauges(triton, "llm")["active_sequences"] == 1
        responses.cancel()
        # freed within one decode step of the model seeing the cancel (it asks each stream every 50 ms)
        took = await wait_for_gauge(triton, "llm", "kv_slots_in_use", 0)
    assert took < 2.0
    assert gauges(triton, "llm")["active_sequences"] == 0


async def test_requests_beyond_max_sequences_queue_and_all_complete(triton: TritonProcess, reference: Any) -> None:
    # llm_ctx decodes one sequence at a time: of three concurrent requests, two wait in its FIFO queue.
    tok = reference[1]
    prompts = [tok.encode(t).ids for t in ("1, 2, 3, 4, 5, 6,", "-" * 12, ">>> x = 1\n>>>")]
    seen_queued = 0.0

    async def watch() -> None:
        nonlocal seen_queued
        while True:
            seen_queued = max(seen_queued, gauges(triton, "llm_ctx").get("queued_requests", 0))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        got = await asyncio.gather(*(stream(triton, request_inputs(p, 100), model="llm_ctx") for p in prompts))
    finally:
        watcher.cancel()
    for prompt, result in zip(prompts, got, strict=True):
        ref_ids, _, gen = reference_run(reference, prompt, max_tokens=100, max_context=SHORT_CONTEXT)
        assert result.tokens == ref_ids and result.final["finish_reason"] == gen.finish_reason
    assert seen_queued >= 1


async def test_a_repeated_prompt_reports_its_cached_tokens_in_the_final_response(
        triton: TritonProcess, reference: tuple[LlamaForCausalLM, Tokenizer, frozenset[int]]) -> None:
    _, tok, eos = reference
    prompt = tok.encode("Return the number of items in the list, and the list of the given name. " * 2).ids
    client = TritonLLMClient(triton.grpc_url)
    try:
        async def once(model: str) -> tuple[list[int], int]:
            chunks = [c async for c in client.generate(model, GenerateParams(prompt, 12, stop_token_ids=sorted(eos)))]
            assert chunks[-1].finish_reason is not None and chunks[-1].prompt_tokens == len(prompt)
            return [t for c in chunks for t in c.token_ids], chunks[-1].cached_tokens

        plain, none = await once("llm")
        cold, first = await once("llm_prefix")
        warm, second = await once("llm_prefix")
    finally:
        await client.close()
    assert none == first == 0
    assert second == (len(prompt) - 1) // 8 * 8 > 0
    assert plain == cold == warm
