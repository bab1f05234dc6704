"""The executor's Channel on a real Triton, read through the router's ``ExecutorChannel``: many sequences on one
stream give what per-request Generate calls give, in fewer frames than tokens; a bad open fails only its
sequence; leaving or timing out cancels down to Triton; a draining executor refuses new opens and finishes the
live ones."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from inferplane.assets import CATALOG, TINY_LLAMA
from inferplane.cli.launcher import free_port
from inferplane.common import wire
from inferplane.common.errors import DeadlineExceeded
from inferplane.common.settings import ServerSettings
from inferplane.executor.main import Executor
from inferplane.executor.settings import ExecutorSettings, TritonSettings
from inferplane.router.channel import ExecutorChannel
from inferplane.tokenization.bundle import TokenizerBundle
from inferplane.v1 import common_pb2, executor_pb2, executor_pb2_grpc

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
async def executor(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Executor]:
    work = tmp_path_factory.mktemp("executor")
    settings = ExecutorSettings(
        server=ServerSettings(port=0, grace_seconds=1), catalog=CATALOG, models=["tiny-llama"],
        triton=TritonSettings(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                              work_dir=Path(work), exit_timeout_s=1, ready_timeout_s=180))
    ex = Executor(settings)
    await ex.start()
    yield ex
    await ex.stop(0)


@pytest.fixture
async def channel(executor: Executor) -> AsyncIterator[ExecutorChannel]:
    address = f"127.0.0.1:{executor.server.port}"
    ch = ExecutorChannel(address, grpc.aio.insecure_channel(address), silence_s=10.0)
    yield ch
    await ch.close()


def request(prompt: str = "Return the", max_tokens: int = 12,
            **sampling: float) -> executor_pb2.ExecutorGenerateRequest:
    req = executor_pb2.ExecutorGenerateRequest(model="tiny-llama", max_tokens=max_tokens,
                                               prompt_token_ids=TokenizerBundle.from_dir(TINY_LLAMA).encode(prompt))
    req.sampling.temperature = 0
    for name, value in sampling.items():
        setattr(req.sampling, name, value)
    return req


def long_request(seed: int) -> executor_pb2.ExecutorGenerateRequest:
    """Up to 400 tokens (greedy on this prompt: no end-of-sequence for hundreds): still running whenever a test
    acts on it. ``seed``: told apart in logs only."""
    req = request(max_tokens=400)
    req.sampling.seed = seed
    return req


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


Outcome = tuple[list[int], int, int, int]  # token ids, finish reason, prompt and completion tokens


def outcome(msgs: list[executor_pb2.ExecutorGenerateResponse]) -> Outcome:
    assert msgs[-1].finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert all(m.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    usage = msgs[-1].usage
    return [t for m in msgs for t in m.token_ids], msgs[-1].finish_reason, usage.prompt_tokens, usage.completion_tokens


async def on_channel(ch: ExecutorChannel, req: executor_pb2.ExecutorGenerateRequest) -> Outcome:
    async with await ch.open(req, timeout=60) as seq:
        return outcome([m async for m in seq])


async def on_generate(ex: Executor, req: executor_pb2.ExecutorGenerateRequest) -> Outcome:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ex.server.port}") as ch:
        return outcome([m async for m in executor_pb2_grpc.ExecutorServiceStub(ch).Generate(req, timeout=60)])


async def wait_idle(ex: Executor, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while ex.channels.active:
        assert time.monotonic() < deadline, f"{ex.channels.active} sequences still live on the executor"
        await asyncio.sleep(0.05)


async def test_sixteen_sequences_on_one_channel_match_generate_in_fewer_frames(
        executor: Executor, channel: ExecutorChannel) -> None:
    prompts = ["Return the", "Once upon a time", "The capital of France", "def main():"]
    reqs = [request(prompts[i % 4], max_tokens=24 + i) for i in range(16)]
    expected = [await on_generate(executor, r) for r in reqs]  # one at a time; greedy: the same whatever the batch
    frames = counter("inferplane_router_channel_frames_total")
    tokens = counter("inferplane_router_channel_tokens_total")
    got = await asyncio.gather(*(on_channel(channel, r) for r in reqs))
    frames = counter("inferplane_router_channel_frames_total") - frames
    tokens = counter("inferplane_router_channel_tokens_total") - tokens
    assert got == expected
    assert tokens == sum(len(ids) for ids, *_ in got)
    print(f"\n16 sequences: {tokens:.0f} tokens in {frames:.0f} frames")
    # several sequences' tokens share a frame (one Triton stream per sequence here, so a model step's tokens still
    # arrive spread over a few reads: seen 0.33-0.71 frames per token; the step backend makes it one frame per step)
    assert frames < tokens * 0.9, (frames, tokens)
    await wait_idle(executor)


async def test_a_bad_open_fails_only_its_sequence(executor: Executor, channel: ExecutorChannel) -> None:
    bad = request(top_p=1.5)  # the model refuses it (INVALID_ARG): the status and reason pass through
    good = asyncio.create_task(on_channel(channel, request(max_tokens=8)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.open(bad, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_p must be in" in (err.value.details() or "")
    info = wire.error_info(err.value.trailing_metadata())
    assert info is not None and info.reason == "ERROR_REASON_INVALID_REQUEST"
    empty = executor_pb2.ExecutorGenerateRequest(model="tiny-llama", max_tokens=4)  # refused by the executor
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.open(empty, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert wire.error_info(err.value.trailing_metadata()).metadata["param"] == "prompt"  # type: ignore[union-attr]
    unknown = request()
    unknown.model = "nope"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.open(unknown, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    ids, *_ = await good
    assert ids


async def test_leaving_a_sequence_cancels_it_in_triton(executor: Executor, channel: ExecutorChannel) -> None:
    cancels = counter("inferplane_executor_cancellations_total")
    seq = await channel.open(long_request(5), timeout=60)
    async with seq:
        got = 0
        async for msg in seq:
            got += len(msg.token_ids)
            if got >= 3:
                break
    await wait_idle(executor)
    assert counter("inferplane_executor_cancellations_total") == cancels + 1
    ids, *_ = await on_channel(channel, request(max_tokens=3))  # the model is free again
    assert len(ids) >= 1


async def test_the_deadline_ends_the_wait_and_the_sequence(executor: Executor, channel: ExecutorChannel) -> None:
    seq = await channel.open(long_request(7), timeout=0.5)
    with pytest.raises(DeadlineExceeded):
        async with seq:
            async for _ in seq:
                pass
    await wait_idle(executor)  # cancelled by the router's cancel or the executor's own timer


async def test_the_executor_ends_a_sequence_past_its_timeout_on_its_own(executor: Executor) -> None:
    """The router's cancel may be lost: the open's timeout_ms is enforced by the executor (DEADLINE_EXCEEDED)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{executor.server.port}") as ch:
        call = executor_pb2_grpc.ExecutorServiceStub(ch).Channel()
        await call.write(executor_pb2.ChannelRequest(opens=[executor_pb2.SequenceOpen(
            seq=1, request=long_request(9), timeout_ms=300)]))
        failure = None
        while failure is None:
            frame = await asyncio.wait_for(call.read(), 10)
            failure = next((f for f in frame.failed if f.seq == 1), None)
            assert not frame.ended, frame
        assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert failure.reason == common_pb2.ERROR_REASON_TIMEOUT
        call.cancel()
    await wait_idle(executor)


async def test_a_router_that_leaves_cancels_its_sequences(executor: Executor) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{executor.server.port}") as ch:
        call = executor_pb2_grpc.ExecutorServiceStub(ch).Channel()
        await call.write(executor_pb2.ChannelRequest(opens=[
            executor_pb2.SequenceOpen(seq=s, request=long_request(s))
            for s in (1, 2, 3)]))
        while not (await asyncio.wait_for(call.read(), 30)).token_ids:
            pass
        assert executor.channels.active == 3
        call.cancel()  # the router is gone
    await wait_idle(executor)


async def test_draining_refuses_new_opens_and_finishes_live_ones(executor: Executor) -> None:
    address = f"127.0.0.1:{executor.server.port}"
    ch = ExecutorChannel(address, grpc.aio.insecure_channel(address), silence_s=10.0)
    try:
        live = await ch.open(request(max_tokens=40, temperature=1.0, seed=3), timeout=60)
        executor.channels.drain()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.open(request(), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the router retries it on another replica
        async with live:
            msgs = [m async for m in live]
        assert msgs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert sum(len(m.token_ids) for m in msgs) == 40
        deadline = time.monotonic() + 5
        while ch._link is not None and ch._link.broken is None:  # the executor ended the drained channel
            assert time.monotonic() < deadline, "the drained channel was not ended"
            await asyncio.sleep(0.05)
    finally:
        executor.channels.draining = False
        await ch.close()
