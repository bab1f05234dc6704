"""The engine's bookkeeping on the channel path: a caller cancelled at any point leaves exactly one usage record
whenever the executor was asked, the queue slot and the replica's count are given back, and a sequence left
before its end is cancelled on the channel (never one that ended).

The router's real ``ExecutorChannel`` runs over a scripted ``Channel`` call (frames one event-loop step apart,
as from a socket); the engine, lease and replica set are the real ones (``test_engine_cleanup.py``'s fakes for
the tokenizer and metering).
"""

from __future__ import annotations

import asyncio
from typing import Any

from inferplane.common.catalog import Catalog
from inferplane.router.channel import ExecutorChannel
from inferplane.router.engine import GenerationEngine
from inferplane.router.replicas import Replica, ReplicaSet
from inferplane.v1 import common_pb2, executor_pb2
from tests.unit.test_engine_cleanup import MODEL, FakeMetering, FakeTokenizers, consume


class ScriptedCall:
    """A ``Channel`` call: each open gets ``n`` frames of one token, the last with its end, one step apart."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.opens: list[int] = []
        self.cancels: list[int] = []
        self.ends_read: list[int] = []  # sequences whose end frame the router has read
        self.cancelled_after_end: list[int] = []
        self._frames: asyncio.Queue[executor_pb2.ChannelFrame] = asyncio.Queue()
        self._feeders: list[asyncio.Task[None]] = []

    async def write(self, req: executor_pb2.ChannelRequest) -> None:
        self.cancels.extend(req.cancels)
        self.cancelled_after_end += [seq for seq in req.cancels if seq in self.ends_read]
        for op in req.opens:
            self.opens.append(op.seq)
            self._feeders.append(asyncio.create_task(self._feed(op.seq)))

    async def _feed(self, seq: int) -> None:
        for i in range(self.n):
            await asyncio.sleep(0)
            frame = executor_pb2.ChannelFrame(seq=[seq], count=[1], token_ids=[10 + i])
            if i == self.n - 1:
                frame.ended.add(seq=seq, finish_reason=common_pb2.FINISH_REASON_LENGTH,
                                usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=self.n))
            self._frames.put_nowait(frame)

    async def read(self) -> executor_pb2.ChannelFrame:
        frame = await self._frames.get()
        self.ends_read.extend(e.seq for e in frame.ended)
        return frame

    def cancel(self) -> bool:
        for task in self._feeders:
            task.cancel()
        return True


class ScriptedChannel:
    """Enough of a ``grpc.aio.Channel`` for ``ExecutorServiceStub``: ``Channel`` hands out ``call``."""

    def __init__(self, call: ScriptedCall) -> None:
        self.call = call

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return lambda *a, **k: self.call

    def __getattr__(self, name: str) -> Any:  # unary_unary, unary_stream: the stub's other methods, unused here
        return lambda *a, **k: None

    async def close(self, grace: float | None = None) -> None:
        return None


def engine_for(call: ScriptedCall) -> tuple[GenerationEngine, FakeMetering, Replica]:
    metering = FakeMetering()
    replicas = ReplicaSet(["fake:1"], channel_factory=lambda address: None)  # type: ignore[arg-type,return-value]
    link = ExecutorChannel("fake:1", ScriptedChannel(call), silence_s=30.0)  # type: ignore[arg-type]
    replica = replicas.replicas["fake:1"] = Replica("fake:1", None, None, serving=True, link=link)  # type: ignore[arg-type]
    engine = GenerationEngine(catalog=Catalog(models=[MODEL]), tokenizer=FakeTokenizers(),  # type: ignore[arg-type]
                              executors=replicas, metering=metering)  # type: ignore[arg-type]
    return engine, metering, replica


async def test_a_request_on_the_channel_is_billed_once_with_the_models_counts() -> None:
    call = ScriptedCall(5)
    engine, metering, replica = engine_for(call)
    got: list[Any] = []
    await consume(engine, got)
    await engine.drain()
    assert got[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert sum(d.token_count for d in got) == 5
    [record] = metering.records
    assert (record.prompt_tokens, record.completion_tokens, record.finish_reason) == (3, 5, "length")
    assert call.cancels == [] and replica.outstanding == 0


async def test_a_caller_cancelled_at_any_point_leaves_exactly_one_record_and_cancels_the_sequence() -> None:
    finished_at = None
    for k in range(200):
        call = ScriptedCall(6)
        engine, metering, replica = engine_for(call)
        task = asyncio.create_task(consume(engine, []))
        for _ in range(k):
            await asyncio.sleep(0)
        done_by_itself = task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await engine.drain()
        for _ in range(5):  # the link's writer sends the cancel in a later step
            await asyncio.sleep(0)
        assert len(metering.records) == (1 if call.opens else 0), (k, metering.records)
        assert replica.outstanding == 0 and engine.capacity.gate("m").running == 0, k
        # every sequence opened ended on the executor or was cancelled there; none was cancelled after its end
        assert set(call.opens) <= set(call.cancels) | set(call.ends_read), k
        assert call.cancelled_after_end == [] and len(call.cancels) == len(set(call.cancels)), k
        assert replica.link is not None
        await replica.link.close()
        if done_by_itself:
            finished_at = k
            assert metering.records[0].finish_reason == "length"
            break
    assert finished_at is not None and finished_at > 5  # the cancellation points covered the whole request
