"""The router's bounded per-model queue: slots, FIFO waiters, fast refusals, and no slot ever leaked."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from inferplane.common import wire
from inferplane.common.server import failure_of
from inferplane.gateway.errors import from_status
from inferplane.router.capacity import Capacity, ModelGate, Overloaded


def gate(capacity: int = 2, max_queue: int = 2, queue_timeout_s: float = 5.0) -> ModelGate:
    box = {"n": capacity}
    g = ModelGate("m", lambda: box["n"], max_queue=max_queue, queue_timeout_s=queue_timeout_s)
    g.box = box  # type: ignore[attr-defined]
    return g


async def test_full_queue_is_refused_at_once_with_retry_after() -> None:
    g = gate(capacity=2, max_queue=2)
    await g.acquire(1.0)
    await g.acquire(1.0)
    waiters = [asyncio.ensure_future(g.acquire(5.0)) for _ in range(2)]
    await asyncio.sleep(0)
    assert (g.running, g.queued) == (2, 2)
    # answered at once: the refusal is decided before the call ever waits (one loop step, no timer)
    refused = asyncio.ensure_future(g.acquire(5.0))
    await asyncio.sleep(0)
    assert refused.done()
    with pytest.raises(Overloaded) as info:
        await refused
    assert info.value.reason == wire.REASON_OVERLOADED
    trailers = dict(failure_of(info.value).trailers())  # what the router's interceptor sends
    assert trailers["x-inferplane-error-code"] == "overloaded" and trailers["retry-after"] == "1"
    assert wire.error_info(trailers.items()).reason == "ERROR_REASON_OVERLOADED"  # type: ignore[union-attr]
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert (g.running, g.queued) == (2, 0)


async def test_release_hands_the_slot_to_the_oldest_waiter() -> None:
    g = gate(capacity=1, max_queue=3)
    await g.acquire(1.0)
    order: list[int] = []

    async def wait(i: int) -> None:
        await g.acquire(5.0)
        order.append(i)

    tasks = [asyncio.ensure_future(wait(i)) for i in range(3)]
    await asyncio.sleep(0)
    for _ in range(3):
        g.release()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert (g.running, g.queued) == (1, 0)
    # a newcomer cannot jump ahead of a waiter: with one waiting, a free slot goes to the waiter
    late = asyncio.ensure_future(g.acquire(5.0))
    await asyncio.sleep(0)
    assert g.queued == 1
    g.release()
    await late
    assert (g.running, g.queued) == (1, 0)


async def test_a_waiter_that_waits_too_long_is_refused_and_leaves_no_trace() -> None:
    g = gate(capacity=1, max_queue=4, queue_timeout_s=0.1)
    await g.acquire(1.0)
    with pytest.raises(Overloaded, match="no capacity within"):
        await g.acquire(5.0)
    # the caller's own, shorter deadline bounds the wait too (the refusal names the bound it waited)
    g.queue_timeout_s = 60.0
    with pytest.raises(Overloaded, match=r"within 0\.05s"):
        await g.acquire(0.05)
    assert (g.running, g.queued) == (1, 0)
    g.release()
    assert g.running == 0


async def test_cancelled_waiters_give_back_what_they_held() -> None:
    g = gate(capacity=1, max_queue=8)
    await g.acquire(1.0)
    tasks = [asyncio.ensure_future(g.acquire(5.0)) for _ in range(8)]
    await asyncio.sleep(0)
    g.release()  # the slot is handed to the first waiter ...
    for t in tasks:  # ... which is cancelled in the same step, before it ran
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert (g.running, g.queued) == (0, 0)
    await g.acquire(1.0)  # and the slot is free for the next request
    assert g.running == 1


async def test_capacity_follows_the_replicas() -> None:
    g = gate(capacity=1, max_queue=4)
    await g.acquire(1.0)
    waiter = asyncio.ensure_future(g.acquire(5.0))
    await asyncio.sleep(0)
    assert g.queued == 1
    g.box["n"] = 2  # type: ignore[attr-defined]  # a replica came back
    g.wake()
    await waiter
    assert (g.running, g.queued) == (2, 0)
    g.box["n"] = 0  # type: ignore[attr-defined]  # no replica serving: still one slot (the call fails fast)
    g.release()
    g.release()
    await g.acquire(1.0)
    assert g.running == 1


async def test_capacity_sizes_each_models_gate_from_its_replicas() -> None:
    serving = {"a": 2, "b": 1}
    cap = Capacity(lambda m: serving[m], per_replica=lambda m: 3, max_queue=lambda m: 0,
                   queue_timeout_s=lambda m: 1.0)
    for _ in range(6):
        await cap.gate("a").acquire(1.0)
    with pytest.raises(Overloaded):
        await cap.gate("a").acquire(1.0)
    for _ in range(3):
        await cap.gate("b").acquire(1.0)
    with pytest.raises(Overloaded):
        await cap.gate("b").acquire(1.0)
    assert cap.gate("a") is cap.gate("a")


def test_the_gateway_answers_overloaded_as_503_with_retry_after() -> None:
    trailers = failure_of(Overloaded("The model `m` is overloaded", retry_after_s=2.5)).trailers()
    typed = [(k, v) for k, v in trailers if k != "x-inferplane-error-code"]  # the typed detail alone decides
    legacy = [(k, v) for k, v in trailers if k != "grpc-status-details-bin"]  # as does the older trailer alone
    for metadata in (trailers, typed, legacy):
        err = from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "The model `m` is overloaded", metadata)
        assert err.status == 503
        assert err.body()["error"]["code"] == "overloaded"
        assert err.body()["error"]["type"] == "server_error"
        assert err.headers["retry-after"] == "3"
    plain = from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "Rate limit reached.", [("retry-after", "3")])
    assert (plain.status, plain.body()["error"]["code"]) == (429, "rate_limit_exceeded")
