"""The executor service on a real Triton (spawned from the nvidia-pytriton wheel) with the shipped model."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferplane.assets import CATALOG, TINY_LLAMA
from inferplane.cli.launcher import free_port
from inferplane.common.settings import ServerSettings
from inferplane.executor.main import Executor
from inferplane.executor.service import coalesce
from inferplane.executor.settings import ExecutorSettings, TritonSettings
from inferplane.executor.triton_client import TritonChunk
from inferplane.tokenization.bundle import TokenizerBundle
from inferplane.v1 import common_pb2, executor_pb2, executor_pb2_grpc

pytestmark = pytest.mark.triton
MODEL_DIR = TINY_LLAMA


@pytest.fixture(scope="module")
async def executor(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Executor]:
    work = tmp_path_factory.mktemp("executor")
    settings = ExecutorSettings(
        server=ServerSettings(port=0, grace_seconds=1), catalog=CATALOG,
        triton=TritonSettings(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                              work_dir=Path(work), exit_timeout_s=1, ready_timeout_s=180))
    ex = Executor(settings)
    await ex.start()
    yield ex
    await ex.stop(0)


def prompt_ids() -> list[int]:
    return TokenizerBundle.from_dir(MODEL_DIR).encode("Return the")


def stub(ex: Executor) -> executor_pb2_grpc.ExecutorServiceStub:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{ex.server.port}")
    return executor_pb2_grpc.ExecutorServiceStub(channel)


async def health(ex: Executor) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ex.server.port}") as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(resp.status)


async def test_generate_streams_tokens_then_usage(executor: Executor) -> None:
    req = executor_pb2.ExecutorGenerateRequest(model="tiny-llama", prompt_token_ids=prompt_ids(), max_tokens=12)
    req.sampling.temperature = 0
    msgs = [m async for m in stub(executor).Generate(req, timeout=60)]
    ids = [t for m in msgs for t in m.token_ids]
    last = msgs[-1]
    assert last.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
    assert last.usage.prompt_tokens == len(req.prompt_token_ids)
    assert last.usage.completion_tokens == len(ids) <= 12
    # greedy is deterministic
    again = [t async for m in stub(executor).Generate(req, timeout=60) for t in m.token_ids]
    assert again == ids


async def test_a_stream_interval_groups_tokens_after_the_first(executor: Executor) -> None:
    req = executor_pb2.ExecutorGenerateRequest(model="tiny-llama", prompt_token_ids=prompt_ids(), max_tokens=14,
                                               stream_interval=4)
    req.sampling.temperature = 1.0
    req.sampling.seed = 11
    req.stop_token_ids[:] = []  # all 14 tokens
    msgs = [m async for m in stub(executor).Generate(req, timeout=60)]
    sizes = [len(m.token_ids) for m in msgs]
    # the first message goes out with whatever is ready (tokens that queued up meanwhile go together), then
    # every message but the last waits for 4 or more
    assert sizes[0] >= 1 and all(n >= 4 for n in sizes[1:-1]), sizes
    assert sum(sizes) == msgs[-1].usage.completion_tokens == 14
    assert len(msgs) <= 5  # 1 + ceil(13 / 4) at most


async def test_bad_request_is_invalid_argument(executor: Executor) -> None:
    req = executor_pb2.ExecutorGenerateRequest(model="tiny-llama", prompt_token_ids=[], max_tokens=4)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [m async for m in stub(executor).Generate(req, timeout=30)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_request_the_model_refuses_is_invalid_argument(executor: Executor) -> None:
    # valid for the executor, refused by the Triton model (TritonError INVALID_ARG): the status code carries it
    req = executor_pb2.ExecutorGenerateRequest(model="tiny-llama", prompt_token_ids=[1, 2], max_tokens=4)
    req.sampling.top_p = 1.5
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [m async for m in stub(executor).Generate(req, timeout=30)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_p must be in" in (err.value.details() or "")


async def test_unknown_model_is_not_found(executor: Executor) -> None:
    req = executor_pb2.ExecutorGenerateRequest(model="nope", prompt_token_ids=[1, 2], max_tokens=4)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [m async for m in stub(executor).Generate(req, timeout=30)]
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_status_reports_models_and_version(executor: Executor) -> None:
    status = await stub(executor).GetStatus(executor_pb2.GetStatusRequest(), timeout=10)
    assert sorted(status.ready_models) == ["all-minilm-l6-v2", "tiny-llama"]
    assert status.triton_version and status.active_requests == 0


async def test_cancel_mid_stream_frees_the_model(executor: Executor) -> None:
    req = executor_pb2.ExecutorGenerateRequest(model="tiny-llama", prompt_token_ids=prompt_ids(), max_tokens=400)
    req.sampling.temperature = 1.0
    req.sampling.seed = 5
    call = stub(executor).Generate(req, timeout=60)
    got = 0
    async for m in call:
        got += len(m.token_ids)
        if got >= 3:
            break
    call.cancel()
    # The model stopped: the next request is served promptly and in full.
    small = executor_pb2.ExecutorGenerateRequest(model="tiny-llama", prompt_token_ids=prompt_ids(), max_tokens=3)
    small.sampling.temperature = 0
    msgs = [m async for m in stub(executor).Generate(small, timeout=30)]
    assert msgs[-1].usage.completion_tokens == sum(len(m.token_ids) for m in msgs)
    assert executor.servicer.active == 0


async def test_coalesce_batches_what_arrived_while_the_reader_was_busy() -> None:
    async def chunks() -> AsyncIterator[TritonChunk]:
        for i in range(10):
            yield TritonChunk([i])
        yield TritonChunk([], finish_reason="length", prompt_tokens=2, completion_tokens=10)

    out = []
    async for tokens, final in coalesce(chunks()):
        out.append((tokens.token_ids, final))
        await asyncio.sleep(0.01)  # a slow reader
    assert [t for ids, _ in out for t in ids] == list(range(10))
    assert len(out) < 11  # tokens that queued up went out together
    assert out[-1][1] is not None and out[-1][1].completion_tokens == 10


async def test_coalesce_with_a_stream_interval_sends_the_first_token_alone_then_groups() -> None:
    async def chunks() -> AsyncIterator[TritonChunk]:
        for i in range(10):
            await asyncio.sleep(0.001)  # one token per model step, a reader that keeps up
            yield TritonChunk([i])
        yield TritonChunk([], finish_reason="length", prompt_tokens=2, completion_tokens=10)

    out = [(tokens.token_ids, final) async for tokens, final in coalesce(chunks(), 4)]
    assert [ids for ids, _ in out] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]  # the last: what is left, at once
    assert [final is not None for _, final in out] == [False, False, False, True]
    # interval 1 (the default): every token in a message of its own when the reader keeps up
    assert [t.token_ids for t, _ in [x async for x in coalesce(chunks(), 1)]] == [[i] for i in range(10)]


async def test_coalesce_lets_a_finished_stream_end_by_itself() -> None:
    """After the final chunk the source may still read its stream's end; cancelling it then would cancel a
    finished Triton stream (tritonserver leaks ~7 KB for each). A consumer that leaves early still cancels."""
    events: list[str] = []

    async def chunks(n: int) -> AsyncIterator[TritonChunk]:
        try:
            for i in range(n):
                await asyncio.sleep(0.001)
                yield TritonChunk([i])
            yield TritonChunk([], finish_reason="stop", prompt_tokens=1, completion_tokens=n)
            await asyncio.sleep(0.05)  # reading the stream to its status
            events.append("read to end")
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    async for _, final in coalesce(chunks(3)):
        if final is not None:
            break
    await asyncio.sleep(0.2)
    assert events == ["read to end"]

    events.clear()
    early = coalesce(chunks(10_000))
    await early.__anext__()
    await early.aclose()  # the caller left mid-stream
    assert events == ["cancelled"]


async def test_triton_killed_is_restarted_and_health_follows(executor: Executor) -> None:
    assert await health(executor) == health_pb2.HealthCheckResponse.SERVING
    proc = executor.process
    assert proc is not None and proc.proc is not None
    os.killpg(proc.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while await health(executor) == health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "health never left SERVING after Triton died"
        await asyncio.sleep(0.2)
    deadline = time.monotonic() + 180
    while await health(executor) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "Triton was not restarted"
        await asyncio.sleep(0.5)
    req = executor_pb2.ExecutorGenerateRequest(model="tiny-llama", prompt_token_ids=prompt_ids(), max_tokens=2)
    msgs = [m async for m in stub(executor).Generate(req, timeout=60)]
    assert msgs[-1].usage.completion_tokens >= 1
