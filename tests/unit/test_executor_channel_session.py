"""The executor's channel logic: frames built column-wise, one per flush, merged while the router reads slowly;
per-sequence timeouts; drain; a router that leaves. A scripted ``GenerationBackend`` stands in (the backend's
own behaviour on a real Triton is in ``tests/integration/test_executor_channel.py``)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Hashable

import grpc
import pytest

from inferplane.common.errors import InvalidArgument
from inferplane.executor.backend import SequenceSink
from inferplane.executor.channel import ChannelService, FrameBuilder, LiveSequence
from inferplane.executor.triton_client import GenerateParams
from inferplane.v1 import common_pb2, executor_pb2


class ScriptedBackend:
    """Records opens; a test drives each sequence's events through ``sink``. ``cancel`` ends it as a backend must."""

    def __init__(self) -> None:
        self.live: dict[int, LiveSequence] = {}
        self.sink: SequenceSink | None = None
        self.cancelled: list[int] = []
        self.params: dict[int, GenerateParams] = {}

    def open(self, key: Hashable, model: str, params: GenerateParams, request_id: str, sink: SequenceSink) -> None:
        assert isinstance(key, LiveSequence)
        self.live[key.seq], self.sink, self.params[key.seq] = key, sink, params

    def cancel(self, key: Hashable) -> None:
        assert isinstance(key, LiveSequence) and self.sink is not None
        if self.live.pop(key.seq, None) is not None:
            self.cancelled.append(key.seq)
            self.sink.finished(key, "cancelled", 2, 0)

    async def close(self) -> None:
        pass

    def tokens(self, seq: int, ids: list[int], logprobs: tuple[float, ...] = ()) -> None:
        assert self.sink is not None
        self.sink.tokens(self.live[seq], ids, logprobs)

    def finish(self, seq: int, completion: int) -> None:
        assert self.sink is not None
        self.sink.finished(self.live.pop(seq), "length", 2, completion)


class Router:
    """The router's end of one channel: ``write`` requests, ``frame()`` reads the next frame."""

    def __init__(self, service: ChannelService) -> None:
        self.requests: asyncio.Queue[executor_pb2.ChannelRequest | None] = asyncio.Queue()
        self.frames = service.serve(self._requests())

    async def _requests(self) -> AsyncIterator[executor_pb2.ChannelRequest]:
        while (req := await self.requests.get()) is not None:
            yield req

    def open(self, *seqs: int, timeout_ms: int = 0, max_tokens: int = 8, omit_logprobs: bool = False) -> None:
        self.requests.put_nowait(executor_pb2.ChannelRequest(opens=[executor_pb2.SequenceOpen(
            seq=s, timeout_ms=timeout_ms,
            request=executor_pb2.ExecutorGenerateRequest(model="m", prompt_token_ids=[1, 2], max_tokens=max_tokens,
                                                         omit_logprobs=omit_logprobs))
            for s in seqs]))

    def cancel(self, *seqs: int) -> None:
        self.requests.put_nowait(executor_pb2.ChannelRequest(cancels=seqs))

    async def frame(self) -> executor_pb2.ChannelFrame:
        return await asyncio.wait_for(self.frames.__anext__(), 5)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 (the loop's own steps are what is waited for)
            await asyncio.sleep(0)


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
def service(backend: ScriptedBackend) -> ChannelService:
    return ChannelService(backend, heartbeat_s=60.0)


def test_a_frame_is_column_wise_and_merges_per_sequence() -> None:
    b = FrameBuilder()
    assert not b
    b.tokens(3, [30], [])
    b.tokens(1, [10, 11], [])
    b.tokens(3, [31], [])
    b.finish(3, "stop", 4, 2)
    b.fail(5, InvalidArgument("bad", param="max_tokens"))
    frame = b.take(heartbeat=[1, 3])
    assert list(frame.seq) == [3, 1] and list(frame.count) == [2, 2] and list(frame.token_ids) == [30, 31, 10, 11]
    assert not frame.logprobs
    assert frame.ended[0].seq == 3 and frame.ended[0].finish_reason == common_pb2.FINISH_REASON_STOP
    assert frame.ended[0].usage.total_tokens == 6
    failure = frame.failed[0]
    assert (failure.seq, failure.code, failure.reason, failure.param) == (
        5, grpc.StatusCode.INVALID_ARGUMENT.value[0], common_pb2.ERROR_REASON_INVALID_REQUEST, "max_tokens")
    assert list(frame.heartbeat.active) == [1, 3]
    assert not b and not b.take().HasField("heartbeat")


def test_logprobs_stay_aligned_with_token_ids() -> None:
    b = FrameBuilder()
    b.tokens(1, [10, 11], [])
    b.tokens(2, [20], [-0.5])
    frame = b.take()
    assert len(frame.logprobs) == len(frame.token_ids) == 3
    assert math.isnan(frame.logprobs[0]) and math.isnan(frame.logprobs[1]) and frame.logprobs[2] == -0.5


async def test_events_of_one_iteration_are_one_frame_and_pile_up_while_the_router_is_away(
        service: ChannelService, backend: ScriptedBackend) -> None:
    router = Router(service)
    router.open(1, 2, 3)
    next_frame = asyncio.create_task(router.frame())
    await until(lambda: len(backend.live) == 3)
    assert sorted(backend.live) == [1, 2, 3] and service.active == 3
    for seq in (1, 2, 3):  # one scheduling round
        backend.tokens(seq, [seq * 10])
    frame = await next_frame
    assert list(frame.seq) == [1, 2, 3] and list(frame.token_ids) == [10, 20, 30]
    for i in range(3):  # three rounds while nobody reads: one frame
        await settle()
        backend.tokens(1, [11 + i])
    backend.finish(1, 4)
    frame = await router.frame()
    assert list(frame.seq) == [1] and list(frame.token_ids) == [11, 12, 13]
    assert frame.ended[0].seq == 1 and frame.ended[0].usage.completion_tokens == 4
    assert service.active == 2
    router.requests.put_nowait(None)  # the router leaves: what is live is cancelled, the stream ends
    frames = [f async for f in router.frames]
    assert sorted(backend.cancelled) == [2, 3] and service.active == 0
    assert sorted(e.seq for f in frames for e in f.ended) == [2, 3]


async def test_a_bad_open_fails_alone(service: ChannelService, backend: ScriptedBackend) -> None:
    router = Router(service)
    router.open(1)
    router.open(2, max_tokens=0)
    frame = await router.frame()
    assert [f.seq for f in frame.failed] == [2] and frame.failed[0].param == "max_tokens"
    assert list(backend.live) == [1]
    await router.frames.aclose()  # the RPC ends (the router is gone): its sequences are cancelled
    assert backend.cancelled == [1] and service.active == 0


async def test_a_sequence_past_its_timeout_fails_with_deadline_exceeded(service: ChannelService,
                                                                       backend: ScriptedBackend) -> None:
    router = Router(service)
    router.open(1, timeout_ms=50)
    frame = await router.frame()
    assert backend.cancelled == [1]
    assert frame.failed[0].code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert frame.failed[0].reason == common_pb2.ERROR_REASON_TIMEOUT
    await router.frames.aclose()


async def test_draining_refuses_opens_and_ends_the_stream_when_the_last_sequence_ends(
        service: ChannelService, backend: ScriptedBackend) -> None:
    router = Router(service)
    router.open(1)
    next_frame = asyncio.create_task(router.frame())
    await until(lambda: list(backend.live) == [1])
    service.drain()
    router.open(2)
    frame = await next_frame
    assert [f.seq for f in frame.failed] == [2] and frame.failed[0].code == grpc.StatusCode.UNAVAILABLE.value[0]
    backend.tokens(1, [5])
    backend.finish(1, 1)
    frames = [f async for f in router.frames]  # the stream ends once sequence 1 has
    assert [e.seq for f in frames for e in f.ended] == [1]
    assert backend.cancelled == []


async def test_heartbeats_list_the_live_sequences(backend: ScriptedBackend) -> None:
    service = ChannelService(backend, heartbeat_s=0.05)
    router = Router(service)
    router.open(4, 2)
    while not (frame := await router.frame()).HasField("heartbeat"):
        pass
    assert list(frame.heartbeat.active) == [2, 4]
    router.cancel(4)
    while not (frame := await router.frame()).HasField("heartbeat"):
        pass
    assert list(frame.heartbeat.active) == [2]
    await router.frames.aclose()


def test_block_reports_merge_per_model_in_a_frame() -> None:
    b = FrameBuilder()
    b.blocks("m", False, [1, 2], [])
    b.blocks("m", False, [3], [2])  # 2 gained then lost: lost (harmless where it was never held)
    b.blocks("n", True, [7, 8], [])  # a snapshot
    b.blocks("n", False, [9], [8])  # a change after it: merged into the snapshot
    assert b
    frame = b.take()
    m, n = frame.blocks
    assert (m.model, m.reset, sorted(m.stored), list(m.removed)) == ("m", False, [1, 3], [2])
    assert (n.model, n.reset, sorted(n.stored), list(n.removed)) == ("n", True, [7, 9], [])
    assert not b and not b.take().blocks


async def test_a_router_gets_every_models_blocks_first_then_their_changes(service: ChannelService) -> None:
    service.blocks.apply("m", True, [1, 2, 3], [])  # reported before this router came
    service.blocks.apply("m", False, [4], [1])
    first, second = Router(service), Router(service)
    frame = await first.frame()
    (report,) = frame.blocks
    assert report.model == "m" and report.reset and sorted(report.stored) == [2, 3, 4]
    service.blocks.apply("m", False, [5], [2])
    for router in (first, second):  # every router: the second's first frame is a snapshot with the change in it
        frame = await router.frame()
        (report,) = frame.blocks
        if router is first:
            assert not report.reset and list(report.stored) == [5] and list(report.removed) == [2]
        else:
            assert report.reset and sorted(report.stored) == [3, 4, 5]
    assert service.blocks.held("m") == {3, 4, 5}
    await first.frames.aclose()
    service.blocks.apply("m", False, [6], [])  # a router that left gets nothing more
    assert len(service.blocks._subscribers) == 1
    await second.frames.aclose()


async def test_a_sequence_opened_with_omit_logprobs_sends_none(service: ChannelService,
                                                               backend: ScriptedBackend) -> None:
    """The model always computes them; a sequence whose router asked for none leaves them out of the frame (the
    other sequences' stay aligned with their ids)."""
    router = Router(service)
    router.open(1, omit_logprobs=True)
    router.open(2)
    next_frame = asyncio.create_task(router.frame())
    await until(lambda: {1, 2} <= set(backend.live))
    backend.tokens(1, [10, 11], (-0.5, -0.25))
    backend.tokens(2, [20], (-1.0,))
    frame = await next_frame
    assert list(frame.seq) == [1, 2] and list(frame.token_ids) == [10, 11, 20]
    assert math.isnan(frame.logprobs[0]) and math.isnan(frame.logprobs[1]) and frame.logprobs[2] == -1.0
    next_frame = asyncio.create_task(router.frame())
    await settle()
    backend.tokens(1, [12], (-0.75,))  # alone: no logprobs column at all
    frame = await next_frame
    assert list(frame.token_ids) == [12] and not frame.logprobs
