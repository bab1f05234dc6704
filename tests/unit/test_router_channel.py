"""The router's ``ExecutorChannel`` against a scripted executor: a real grpc.aio server whose ``Channel`` sends the
frames a test hands it (these tests are about the router's own logic: batching, dispatch, merging, cancel,
breaks, silence, deadlines, retry)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from inferplane.common import wire
from inferplane.common.errors import DeadlineExceeded
from inferplane.router.channel import ExecutorChannel
from inferplane.router.replicas import ReplicaSet, replica_fault
from inferplane.v1 import common_pb2, executor_pb2, executor_pb2_grpc

END = object()  # handed to the script: end the stream with OK


class ScriptedExecutor(executor_pb2_grpc.ExecutorServiceServicer):
    """``Channel`` records what the router writes and sends what ``send`` is given (an exception aborts)."""

    def __init__(self) -> None:
        self.requests: list[executor_pb2.ChannelRequest] = []
        self.opened: asyncio.Queue[executor_pb2.SequenceOpen] = asyncio.Queue()
        self.cancels: list[int] = []
        self.calls = 0
        self._out: asyncio.Queue[object] = asyncio.Queue()

    def send(self, item: object) -> None:
        self._out.put_nowait(item)

    async def Channel(self, request_iterator: AsyncIterator[executor_pb2.ChannelRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[executor_pb2.ChannelFrame]:
        self.calls += 1

        async def read() -> None:
            async for req in request_iterator:
                self.requests.append(req)
                self.cancels.extend(req.cancels)
                for op in req.opens:
                    self.opened.put_nowait(op)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await self._out.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(item))
                assert isinstance(item, executor_pb2.ChannelFrame)
                yield item
        finally:
            reader.cancel()


async def serve(script: ScriptedExecutor) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    executor_pb2_grpc.add_ExecutorServiceServicer_to_server(script, server)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedExecutor, ExecutorChannel]]:
    script = ScriptedExecutor()
    server, address = await serve(script)
    ch = ExecutorChannel(address, grpc.aio.insecure_channel(address), silence_s=10.0)
    yield script, ch
    await ch.close()
    await server.stop(None)


def request(rid: str = "r", stream_interval: int = 0) -> executor_pb2.ExecutorGenerateRequest:
    return executor_pb2.ExecutorGenerateRequest(model="m", prompt_token_ids=[1, 2], max_tokens=10, request_id=rid,
                                                stream_interval=stream_interval)


def tokens(**per_seq: list[int]) -> executor_pb2.ChannelFrame:
    """A frame with tokens for ``s1=[...]``, ``s2=[...]``."""
    seqs = [int(k[1:]) for k in per_seq]
    return executor_pb2.ChannelFrame(seq=seqs, count=[len(v) for v in per_seq.values()],
                                     token_ids=[t for v in per_seq.values() for t in v])


def ended(seq: int, completion: int, reason: int = common_pb2.FINISH_REASON_LENGTH) -> executor_pb2.SequenceEnd:
    return executor_pb2.SequenceEnd(seq=seq, finish_reason=reason, usage=common_pb2.Usage(
        prompt_tokens=2, completion_tokens=completion, total_tokens=2 + completion))


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def opened(script: ScriptedExecutor, n: int) -> list[executor_pb2.SequenceOpen]:
    return [await asyncio.wait_for(script.opened.get(), 5) for _ in range(n)]


async def test_opens_of_one_iteration_go_out_together_and_frames_reach_their_sequences(scripted) -> None:  # type: ignore[no-untyped-def]
    script, ch = scripted
    tasks = [asyncio.create_task(ch.open(request(f"r{i}"), timeout=10, traceparent="")) for i in range(5)]
    ops = await opened(script, 5)
    assert [len(r.opens) for r in script.requests] == [5]  # one ChannelRequest for the five opens
    assert [op.request.request_id for op in ops] == [f"r{i}" for i in range(5)]
    assert all(0 < op.timeout_ms <= 10_000 for op in ops)
    seqs = [op.seq for op in ops]
    assert len(set(seqs)) == 5
    # one frame, column-wise, for all five; then sequence 1 alone, three times, while its reader is away
    script.send(executor_pb2.ChannelFrame(seq=seqs, count=[1, 2, 1, 1, 1], token_ids=[10, 20, 21, 30, 40, 50]))
    opened_seqs = await asyncio.gather(*tasks)
    first = opened_seqs[0]
    for ids in ([11], [12, 13], [14]):
        script.send(tokens(**{f"s{seqs[0]}": ids}))
    script.send(executor_pb2.ChannelFrame(ended=[ended(seqs[0], 5)]))
    await asyncio.sleep(0.2)
    async with first:
        msgs = [m async for m in first]
    # nothing was read yet: everything that piled up is one message, with the end
    assert [list(m.token_ids) for m in msgs] == [[10, 11, 12, 13, 14]]
    assert msgs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH and msgs[-1].usage.completion_tokens == 5
    assert first.finished and script.cancels == []
    second = opened_seqs[1]
    assert list((await second.__anext__()).token_ids) == [20, 21]
    for s in opened_seqs[1:]:
        await s.__aexit__(None, None, None)  # left before their end: cancelled, in one request
    await asyncio.sleep(0.1)
    assert sorted(script.cancels) == sorted(seqs[1:]) and len(script.requests[-1].cancels) == 4


async def test_a_stream_interval_groups_the_messages_after_the_first(scripted) -> None:  # type: ignore[no-untyped-def]
    script, ch = scripted
    task = asyncio.create_task(ch.open(request(stream_interval=3), timeout=10))
    (op,) = await opened(script, 1)
    script.send(tokens(**{f"s{op.seq}": [1]}))
    seq = await task
    got: list[list[int]] = []

    async def read() -> None:
        async with seq:
            async for msg in seq:
                got.append(list(msg.token_ids))

    reader = asyncio.create_task(read())
    for ids in ([2], [3], [4], [5], [6], [7], [8]):  # one per frame, the reader always waiting
        await asyncio.sleep(0.02)
        script.send(tokens(**{f"s{op.seq}": ids}))
    await asyncio.sleep(0.02)
    script.send(executor_pb2.ChannelFrame(ended=[ended(op.seq, 8)]))
    await asyncio.wait_for(reader, 5)
    assert got == [[1], [2, 3, 4], [5, 6, 7], [8]]


async def test_the_end_of_a_cancelled_sequence_is_expected_and_an_unknown_one_counted(scripted) -> None:  # type: ignore[no-untyped-def]
    script, ch = scripted
    task = asyncio.create_task(ch.open(request(), timeout=10))
    (op,) = await opened(script, 1)
    script.send(tokens(**{f"s{op.seq}": [7]}))
    seq = await task
    async with seq:
        pass
    await asyncio.sleep(0.1)
    assert script.cancels == [op.seq]
    late = counter("inferplane_router_channel_late_events_total")
    script.send(executor_pb2.ChannelFrame(ended=[ended(op.seq, 1, common_pb2.FINISH_REASON_CANCELLED)]))
    script.send(executor_pb2.ChannelFrame(ended=[ended(999, 1)], seq=[998], count=[1], token_ids=[5]))
    await asyncio.sleep(0.2)
    assert counter("inferplane_router_channel_late_events_total") == late + 2  # 998's tokens and 999's end


async def test_a_heartbeat_listing_a_forgotten_sequence_cancels_it(scripted) -> None:  # type: ignore[no-untyped-def]
    script, ch = scripted
    task = asyncio.create_task(ch.open(request(), timeout=10))
    (op,) = await opened(script, 1)
    script.send(executor_pb2.ChannelFrame(seq=[op.seq], count=[1], token_ids=[1],
                                          heartbeat=executor_pb2.Heartbeat(active=[op.seq, 77])))
    seq = await task
    await asyncio.sleep(0.1)
    assert script.cancels == [77]  # its own live sequence is left alone
    script.send(executor_pb2.ChannelFrame(heartbeat=executor_pb2.Heartbeat(active=[op.seq, 77])))
    await asyncio.sleep(0.1)
    assert script.cancels == [77]  # cancelled once: its end is awaited
    await seq.__aexit__(None, None, None)


async def test_a_failure_is_the_status_a_generate_call_would_have(scripted) -> None:  # type: ignore[no-untyped-def]
    script, ch = scripted
    task = asyncio.create_task(ch.open(request(), timeout=10))
    (op,) = await opened(script, 1)
    script.send(executor_pb2.ChannelFrame(failed=[executor_pb2.SequenceFailure(
        seq=op.seq, code=grpc.StatusCode.INVALID_ARGUMENT.value[0], reason=common_pb2.ERROR_REASON_INVALID_REQUEST,
        message="max_tokens must be at least 1", param="max_tokens")]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await task
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and not replica_fault(err.value)
    assert err.value.details() == "max_tokens must be at least 1"
    info = wire.error_info(err.value.trailing_metadata())
    assert info is not None and info.reason == "ERROR_REASON_INVALID_REQUEST" and info.metadata["param"] == "max_tokens"
    assert script.cancels == []


async def test_a_broken_channel_fails_every_sequence_and_the_next_open_reconnects(scripted) -> None:  # type: ignore[no-untyped-def]
    script, ch = scripted
    started_task = asyncio.create_task(ch.open(request("a"), timeout=10))
    waiting = asyncio.create_task(ch.open(request("b"), timeout=10))
    a, _b = await opened(script, 2)
    script.send(tokens(**{f"s{a.seq}": [1, 2]}))
    started = await started_task
    assert list((await started.__anext__()).token_ids) == [1, 2]
    script.send(RuntimeError("executor gone"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await waiting  # no token yet: a replica fault, which ReplicaSet.open retries elsewhere
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and replica_fault(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await started.__anext__()  # after its first tokens: the request ends with the error
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    await started.__aexit__(None, None, None)
    task = asyncio.create_task(ch.open(request("c"), timeout=10))
    (c,) = await opened(script, 1)
    script.send(tokens(**{f"s{c.seq}": [3]}))
    assert list((await (await task).__anext__()).token_ids) == [3]
    assert script.calls == 2 and c.seq > a.seq  # a new stream; numbers never reused on the channel


async def test_an_executor_that_ends_the_channel_fails_what_is_live_there(scripted) -> None:  # type: ignore[no-untyped-def]
    script, ch = scripted
    task = asyncio.create_task(ch.open(request(), timeout=10))
    await opened(script, 1)
    script.send(END)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await task
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_silent_channel_is_broken_after_silence_s() -> None:
    script = ScriptedExecutor()
    server, address = await serve(script)
    ch = ExecutorChannel(address, grpc.aio.insecure_channel(address), silence_s=0.4)
    try:
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.open(request(), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "sent nothing" in (err.value.details() or "")
        assert 0.4 <= time.monotonic() - t0 < 3
    finally:
        await ch.close()
        await server.stop(None)


async def test_the_deadline_bounds_every_wait_and_cancels(scripted) -> None:  # type: ignore[no-untyped-def]
    script, ch = scripted
    with pytest.raises(DeadlineExceeded):
        await ch.open(request(), timeout=0.2)
    (op,) = await opened(script, 1)
    await asyncio.sleep(0.1)
    assert script.cancels == [op.seq]


async def test_the_replica_set_retries_a_sequence_without_tokens_on_another_replica() -> None:
    scripts = [ScriptedExecutor(), ScriptedExecutor()]
    served = [await serve(s) for s in scripts]
    rs = ReplicaSet([a for _, a in served], channel_factory=grpc.aio.insecure_channel, channel_silence_s=10.0,
                    seed=1)
    await rs.start()
    try:
        assert await rs.wait_any_serving(timeout=10)
        await asyncio.sleep(0.2)
        by_address = dict(zip([a for _, a in served], scripts, strict=True))

        failed: list[str] = []

        async def answer_or_fail() -> None:  # the first replica asked breaks its channel, the second answers
            async def watch(address: str, script: ScriptedExecutor) -> None:
                op = await script.opened.get()
                if failed:
                    script.send(tokens(**{f"s{op.seq}": [9]}))
                else:
                    failed.append(address)
                    script.send(RuntimeError("killed"))

            await asyncio.gather(*(watch(a, s) for a, s in by_address.items()))

        helper = asyncio.create_task(answer_or_fail())
        async with rs.open("m", lambda r: r.link.open(request(), timeout=10)) as seq:  # type: ignore[union-attr]
            assert list((await seq.__anext__()).token_ids) == [9]
            await seq.__aexit__(None, None, None)
        await helper
        assert not rs.replicas[failed[0]].available(time.monotonic())  # ejected
        assert all(r.outstanding == 0 for r in rs.replicas.values())
    finally:
        await rs.close()
        for server, _ in served:
            await server.stop(None)


def test_the_router_uses_the_channel_unless_told_otherwise() -> None:
    from inferplane.router.settings import RouterSettings

    assert RouterSettings().channel_silence() == 20.0
    assert RouterSettings(executor_transport="generate").channel_silence() is None


async def test_a_sequence_that_asked_for_no_logprobs_gets_none_from_a_frame_that_has_them(scripted) -> None:  # type: ignore[no-untyped-def]
    """``omit_logprobs`` goes to the executor; should a frame carry logprobs anyway (an executor that does not know
    the field), they are dropped at the dispatch for that sequence and kept for one that asked."""
    script, ch = scripted
    plain = request("plain")
    plain.omit_logprobs = True
    tasks = [asyncio.create_task(ch.open(req, timeout=10, traceparent="")) for req in (plain, request("lp"))]
    ops = await opened(script, 2)
    assert [op.request.omit_logprobs for op in ops] == [True, False]
    script.send(executor_pb2.ChannelFrame(seq=[ops[0].seq, ops[1].seq], count=[2, 1], token_ids=[10, 11, 20],
                                          logprobs=[-0.5, -0.25, -1.0]))
    without, with_ = await asyncio.gather(*tasks)
    first, second = await without.__anext__(), await with_.__anext__()
    assert list(first.token_ids) == [10, 11] and not first.logprobs
    assert list(second.token_ids) == [20] and list(second.logprobs) == [-1.0]
    for s in (without, with_):
        await s.__aexit__(None, None, None)
