"""The engine's usage record survives a caller who leaves at any point of the cleanup.

A fake executor stub stands in, inside the router's real replica set (these tests are about the router's own
bookkeeping: the lease, the replica's outstanding count, the queue slot): its stream sends the final
message and then holds the stream open, as a real one does for a moment while Triton finishes. The caller is
cancelled exactly there, when the generation is over but the engine is still reading the stream to its end.
The ledger test once lost one record in 1,000 that way (a request cut by its client just as it finished).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from inferplane.common.catalog import Catalog, CatalogModel
from inferplane.router.clients import KeyInfo
from inferplane.router.engine import GenerationEngine, GenerationInput
from inferplane.router.replicas import Replica, ReplicaSet
from inferplane.v1 import common_pb2, executor_pb2, metering_pb2

MODEL = CatalogModel(id="m", triton_model="m", tokenizer="/tmp", context_length=100)


class HeldStream:
    """An executor call: ``messages``, then open until ``end`` is set (or it is cancelled). With ``pause_at``, it
    stops before that message as a model still generating does (``paused`` is set)."""

    def __init__(self, messages: list[executor_pb2.ExecutorGenerateResponse], pause_at: int | None = None) -> None:
        self._messages = list(messages)
        self._sent = 0
        self._pause_at = pause_at
        self.end = asyncio.Event()
        self.paused = asyncio.Event()
        self.draining = asyncio.Event()  # the caller asked for what follows the final message
        self.cancelled = False

    def __aiter__(self) -> HeldStream:
        return self

    async def __anext__(self) -> executor_pb2.ExecutorGenerateResponse:
        if self._sent == self._pause_at and not self.cancelled:
            self.paused.set()
            await asyncio.Event().wait()  # until the caller cancels the call (a cancelled stream reads as ended)
        if self._messages:
            await asyncio.sleep(0)  # a message arrives in a later step of the loop, as from a socket
            self._sent += 1
            return self._messages.pop(0)
        self.draining.set()
        if not self.cancelled:
            await self.end.wait()
        raise StopAsyncIteration

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeStub:
    """An executor's stub whose ``Generate`` hands out ``call`` (and counts how often it was asked)."""

    def __init__(self, call: HeldStream) -> None:
        self.call = call
        self.opened = 0
        self.last: executor_pb2.ExecutorGenerateRequest | None = None

    def Generate(self, req: executor_pb2.ExecutorGenerateRequest, timeout: float | None = None) -> HeldStream:
        self.opened += 1
        self.last = req
        return self.call


def replica_set(stub: FakeStub) -> tuple[ReplicaSet, Replica]:
    """The router's real replica set (pick, outstanding counts, retry) holding one SERVING replica."""
    replicas = ReplicaSet(["fake:1"], channel_factory=lambda address: None)  # type: ignore[arg-type,return-value]
    replica = replicas.replicas["fake:1"] = Replica("fake:1", None, stub, serving=True)  # type: ignore[arg-type]
    return replicas, replica


def stub_of(replica: Replica) -> FakeStub:
    return cast(FakeStub, replica.stub)


class FakeTokenizers:
    async def encode_chat(self, model: str, messages: list[Any], timeout: float) -> Any:
        return SimpleNamespace(token_ids=[1, 2, 3], stop_token_ids=[0])

    def decoder(self, model: str, *, timeout: float | None = None) -> Any:
        class Decoder:
            async def push(self, ids: list[int], final: bool = False) -> str:
                return "x" * len(ids)

            async def close(self) -> None:
                return None

        return Decoder()


class FakeMetering:
    def __init__(self) -> None:
        self.records: list[metering_pb2.UsageRecord] = []
        self.stored = asyncio.Event()

    async def record_usage(self, record: metering_pb2.UsageRecord, timeout: float) -> None:
        self.records.append(record)
        self.stored.set()


def stream_of(n: int, pause_at: int | None = None) -> HeldStream:
    msgs = [executor_pb2.ExecutorGenerateResponse(token_ids=[10 + i]) for i in range(n - 1)]
    last = executor_pb2.ExecutorGenerateResponse(token_ids=[99], finish_reason=common_pb2.FINISH_REASON_LENGTH)
    last.usage.prompt_tokens, last.usage.completion_tokens = 3, n
    return HeldStream([*msgs, last], pause_at)


def engine_for(call: HeldStream, model: CatalogModel = MODEL) -> tuple[GenerationEngine, FakeMetering, Replica]:
    metering = FakeMetering()
    replicas, replica = replica_set(FakeStub(call))
    engine = GenerationEngine(catalog=Catalog(models=[model]), tokenizer=FakeTokenizers(),  # type: ignore[arg-type]
                              executors=replicas, metering=metering)  # type: ignore[arg-type]
    return engine, metering, replica


KEY = KeyInfo(key_id="k1", name="k1", tenant_id="t1")
CHAT = [common_pb2.ChatMessage(role="user", content="hi")]


async def consume(engine: GenerationEngine, got: list[Any]) -> None:
    async for delta in engine.generate(GenerationInput(model="m", messages=CHAT, max_tokens=4), key=KEY,
                                       request_id="r1"):
        got.append(delta)


async def test_a_caller_cancelled_after_the_final_message_is_still_billed() -> None:
    call = stream_of(4)
    engine, metering, replica = engine_for(call)
    got: list[Any] = []
    task = asyncio.create_task(consume(engine, got))
    await call.draining.wait()  # the generation is over; the engine reads what follows the final message
    task.cancel()  # the caller leaves now (its client disconnected)
    await asyncio.gather(task, return_exceptions=True)
    # a hang guard, not a speed bound: without the fix no record is ever written
    await asyncio.wait_for(metering.stored.wait(), timeout=10)
    await engine.drain()
    [record] = metering.records
    assert (record.request_id, record.prompt_tokens, record.completion_tokens) == ("r1", 3, 4)
    assert record.finish_reason == "length"  # it did finish: billed as completed, for what was generated
    assert replica.outstanding == 0
    assert engine.capacity.gate("m").running == 0


async def test_a_completed_request_returns_its_usage_only_once_the_record_is_stored() -> None:
    call = stream_of(2)
    engine, metering, replica = engine_for(call, MODEL.model_copy(update={"stream_interval": 3}))
    got: list[Any] = []
    task = asyncio.create_task(consume(engine, got))
    await call.draining.wait()
    call.end.set()
    await task
    assert got[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert [r.request_id for r in metering.records] == ["r1"]  # stored before the final delta was yielded
    sent = stub_of(replica).last
    assert sent is not None and sent.stream_interval == 3  # the model's, passed to the executor


async def test_a_caller_cancelled_mid_stream_is_billed_as_cancelled() -> None:
    call = stream_of(4, pause_at=2)  # two tokens out, then the model is still generating when the caller leaves
    engine, metering, replica = engine_for(call)
    got: list[Any] = []
    task = asyncio.create_task(consume(engine, got))
    await call.paused.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.wait_for(metering.stored.wait(), timeout=10)
    await engine.drain()
    [record] = metering.records
    assert (record.completion_tokens, record.finish_reason) == (2, "cancelled")
    assert call.cancelled and replica.outstanding == 0


async def test_a_caller_cancelled_at_any_point_leaves_exactly_one_record_and_nothing_held() -> None:
    """Cancel the caller after k event-loop steps, for every k until the request ends by itself: whenever the
    executor was asked to generate, exactly one record (never two); the queue slot and the replica's count are
    always given back."""
    finished_at = None
    for k in range(200):
        call = stream_of(6)
        engine, metering, replica = engine_for(call)

        async def end_soon(call: HeldStream = call) -> None:
            await call.draining.wait()
            await asyncio.sleep(0)
            call.end.set()

        ender = asyncio.create_task(end_soon())
        task = asyncio.create_task(consume(engine, []))
        for _ in range(k):
            await asyncio.sleep(0)
        done_by_itself = task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        ender.cancel()
        await engine.drain()
        assert len(metering.records) == (1 if stub_of(replica).opened else 0), (k, metering.records)
        assert replica.outstanding == 0 and engine.capacity.gate("m").running == 0, k
        if done_by_itself:
            finished_at = k
            assert metering.records[0].finish_reason == "length"
            break
    assert finished_at is not None and finished_at > 5  # the cancellation points covered the whole request
