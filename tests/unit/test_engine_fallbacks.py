"""The engine's fallback rule with a fake executor stub inside the router's real replica set, queue and lease (the
test is about the router's logic: which failure falls back, and what is recorded). A full queue on the model asked
for falls back; an executor that was asked and failed does not (a record is owed for the model that was asked);
the executor request carries the service tier; a request counts once against its key's rate limits however many
models its chain tries."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from inferplane.common.catalog import Catalog, CatalogModel
from inferplane.common.errors import Unavailable
from inferplane.router.admission import Admission, AdmissionRefused, PriceBook
from inferplane.router.capacity import Overloaded
from inferplane.router.clients import KeyInfo
from inferplane.router.engine import GenerationEngine, GenerationInput
from inferplane.router.ratelimit import Limits, LocalRateLimiter, RateLimiter
from inferplane.router.replicas import Replica, ReplicaSet
from inferplane.v1 import common_pb2, executor_pb2, metering_pb2
from tests.unit.test_engine_cleanup import CHAT, KEY, FakeMetering, FakeTokenizers, stream_of

PRIMARY = CatalogModel(id="a", triton_model="ta", tokenizer="/tmp", context_length=100, max_queue=0,
                       concurrency_per_replica=1, fallbacks=["b"])
FALLBACK = CatalogModel(id="b", triton_model="tb", tokenizer="/tmp", context_length=100)


class Refused:
    """An executor call that fails before its first message (the replica is at fault)."""

    def __aiter__(self) -> Refused:
        return self

    async def __anext__(self) -> executor_pb2.ExecutorGenerateResponse:
        await asyncio.sleep(0)
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")

    def cancel(self) -> bool:
        return True


class Stub:
    """Serves ``tb`` (a full stream); refuses ``ta`` when ``refuse_primary``; records the requests it got."""

    def __init__(self, refuse_primary: bool = False) -> None:
        self.refuse_primary = refuse_primary
        self.requests: list[executor_pb2.ExecutorGenerateRequest] = []

    def Generate(self, req: executor_pb2.ExecutorGenerateRequest, timeout: float | None = None) -> Any:
        self.requests.append(req)
        if req.model == "ta" and self.refuse_primary:
            return Refused()
        call = stream_of(3)
        call.end.set()
        return call


def engine_for(stub: Stub) -> tuple[GenerationEngine, FakeMetering]:
    replicas = ReplicaSet(["fake:1"], channel_factory=lambda address: None)  # type: ignore[arg-type,return-value]
    replicas.replicas["fake:1"] = Replica("fake:1", None, stub, serving=True, models={"ta", "tb"},  # type: ignore[arg-type]
                                          reported=True)
    metering = FakeMetering()
    engine = GenerationEngine(catalog=Catalog(models=[PRIMARY, FALLBACK]), tokenizer=FakeTokenizers(),  # type: ignore[arg-type]
                              executors=replicas, metering=metering)  # type: ignore[arg-type]
    return engine, metering


async def run(engine: GenerationEngine, **kw: Any) -> list[Any]:
    inp = GenerationInput(model="a", messages=CHAT, max_tokens=3, **kw)
    return [d async for d in engine.generate(inp, key=KEY, request_id="r1")]


async def test_a_full_queue_falls_back_and_the_fallback_serves_and_is_recorded() -> None:
    stub = Stub()
    engine, metering = engine_for(stub)
    await engine.capacity.gate("a").acquire(1.0)  # the primary's one slot is taken, and it may queue nobody
    deltas = await run(engine, service_tier="priority")
    await engine.drain()
    assert {d.model for d in deltas} == {"b"} and {d.service_tier for d in deltas} == {"priority"}
    assert deltas[-1].last and deltas[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert [r.model for r in stub.requests] == ["tb"]  # the primary's executor was never asked
    assert stub.requests[0].service_tier == common_pb2.SERVICE_TIER_PRIORITY
    [record] = metering.records
    assert (record.model, record.service_tier, record.completion_tokens) == ("b", "priority", 3)
    assert engine.capacity.gate("b").running == 0 and engine.capacity.gate("a").running == 1


async def test_without_fallbacks_the_full_queue_is_the_answer() -> None:
    engine, metering = engine_for(Stub())
    engine.catalog = Catalog(models=[PRIMARY.model_copy(update={"fallbacks": []}), FALLBACK])
    await engine.capacity.gate("a").acquire(1.0)
    with pytest.raises(Overloaded):
        await run(engine)
    with pytest.raises(Overloaded):  # a request's own list naming only the model itself: nothing else to try
        await run(engine, fallback_models=["a"])
    assert metering.records == []


async def test_a_failure_after_the_executor_was_asked_does_not_fall_back() -> None:
    stub = Stub(refuse_primary=True)
    engine, metering = engine_for(stub)
    with pytest.raises(Unavailable):
        await run(engine)
    await engine.drain()
    assert [r.model for r in stub.requests] == ["ta"]  # asked once (no other replica to retry on), never "tb"
    [record] = metering.records  # the primary's, as before fallbacks existed
    assert (record.model, record.finish_reason) == ("a", "error")


class PricelessMetering(FakeMetering):
    """Metering with no prices (the admission asks for them)."""

    async def list_prices(self, timeout: float) -> list[metering_pb2.Price]:
        return []


LIMITED = KeyInfo(key_id="k-limited", name="k", tenant_id="t1", requests_per_minute=1, tokens_per_minute=1000)


async def fall_back_under_limits(limiter: RateLimiter) -> tuple[GenerationEngine, list[Any]]:
    """One request whose primary's queue is full: served by the fallback, with a real admission and ``limiter``.
    No ``max_tokens``: each model counts its whole context (a: 100 tokens, b: 40), so the counts tell them apart."""
    stub = Stub()
    engine, _ = engine_for(stub)
    engine.catalog = Catalog(models=[PRIMARY, FALLBACK.model_copy(update={"context_length": 40})])
    metering = PricelessMetering()
    engine.admission = Admission(metering, limiter, PriceBook(metering))  # type: ignore[arg-type]
    await engine.capacity.gate("a").acquire(1.0)  # the primary's one slot is taken, and it may queue nobody
    inp = GenerationInput(model="a", messages=CHAT)
    deltas = [d async for d in engine.generate(inp, key=LIMITED, request_id="r-limited")]
    await engine.drain()
    assert [r.model for r in stub.requests] == ["tb"] and {d.model for d in deltas} == {"b"}
    return engine, deltas


async def test_a_fallback_counts_the_request_once_and_the_tokens_of_the_model_that_served() -> None:
    limiter = LocalRateLimiter(clock=lambda: 1000.0)  # a frozen clock: nothing refills during the test
    engine, _ = await fall_back_under_limits(limiter)
    # the key's one request per minute is this one (counted once, not once per model tried) ...
    left = limiter.check_now(LIMITED.key_id, requests=0, tokens=0,
                             limits=Limits(LIMITED.requests_per_minute, LIMITED.tokens_per_minute))
    assert (left.remaining_requests, left.remaining_tokens) == (0, 1000 - 40)  # ... with b's 40 tokens, not a's 100
    with pytest.raises(AdmissionRefused, match="requests per minute"):
        [d async for d in engine.generate(GenerationInput(model="b", messages=CHAT), key=LIMITED, request_id="r2")]
