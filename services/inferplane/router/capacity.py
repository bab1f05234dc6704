"""Bounded per-model queues: how many requests of one model the router runs at once, and how many may wait.

Each model has a ``ModelGate``. A request takes a slot before it is sent to an executor and gives it back
when its stream ends. The number of slots is the model's ``concurrency_per_replica`` (its KV-cache slots on one
Triton instance) times the replicas that can serve it now, so capacity follows the replica set as replicas are
ejected, drained or added. Beyond the slots, up to ``max_queue`` requests wait in FIFO order for at most
``queue_timeout_s`` (or their own deadline). A request that finds the queue full, or waits too long, is
refused at once with ``Overloaded``: gRPC RESOURCE_EXHAUSTED with the reason ``ERROR_REASON_OVERLOADED`` (and,
for trailer readers, the error code ``overloaded``) and ``retry-after``, which the gateway answers as HTTP 503.
Nothing queues without bound; memory per waiting request is one future.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from inferplane.common import wire
from inferplane.common.errors import ResourceExhausted

RUNNING = Gauge("inferplane_router_model_running", "Requests holding a model slot (sent to an executor)",
                ["model"])
QUEUED = Gauge("inferplane_router_model_queued", "Requests waiting for a model slot", ["model"])
SHED = Counter("inferplane_router_model_shed", "Requests refused because the model's queue was full or too slow",
               ["model", "reason"])


class Overloaded(ResourceExhausted):
    """The model is at capacity: RESOURCE_EXHAUSTED, reason OVERLOADED, with ``retry-after`` (the gateway answers
    503)."""

    def __init__(self, message: str, *, retry_after_s: float, reason: wire.Reason = wire.REASON_OVERLOADED) -> None:
        super().__init__(message, reason=reason,
                         metadata=((wire.RETRY_AFTER, str(max(1, math.ceil(retry_after_s)))),))
        self.retry_after_s = retry_after_s


class FlexShed(Overloaded):
    """A flex request the model has no room for: reason RESOURCE_UNAVAILABLE, which the gateway answers 429 with
    ``retry-after`` (OpenAI's answer to a flex request it cannot serve)."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s=retry_after_s, reason=wire.REASON_RESOURCE_UNAVAILABLE)


# Tiers in the order their waiters are let in.
TIERS = (wire.PRIORITY_TIER, wire.DEFAULT_TIER, wire.FLEX_TIER)


@dataclass(eq=False, slots=True)
class Waiter:
    """A request waiting for a slot: its future (a result: the slot is its), its tier and tenant."""

    future: asyncio.Future[None]
    tier: str
    tenant: str
    shed: bool = False  # pushed out of a full queue by a request of a higher tier


class ModelGate:
    """Slots plus a bounded queue of waiters for one model. ``capacity`` is read at every decision.

    Waiters are let in by tier (priority, then default, then flex), in arrival order within a tier. A full queue
    refuses a flex request (429, ``FlexShed``), and makes room for a default or priority one by shedding the
    newest flex waiter; with no flex waiter to shed, it refuses (503, ``Overloaded``). A flex request that waits too
    long is a 429 too."""

    def __init__(self, model: str, capacity: Callable[[], int], *, max_queue: int, queue_timeout_s: float,
                 retry_after_s: float = 1.0) -> None:
        self.model = model
        self._capacity = capacity
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.running = 0
        self._waiters: dict[str, deque[Waiter]] = {tier: deque() for tier in TIERS}
        self._queued = 0
        self._running_gauge = RUNNING.labels(model)
        self._queued_gauge = QUEUED.labels(model)

    @property
    def queued(self) -> int:
        return self._queued

    def _room(self) -> bool:
        return self.running < max(1, self._capacity())

    async def acquire(self, timeout: float, *, tier: str = wire.DEFAULT_TIER, tenant: str = "") -> None:
        """Take a slot, waiting at most ``min(timeout, queue_timeout_s)`` in the queue; else ``Overloaded`` (a flex
        request: ``FlexShed``)."""
        if not self._queued and self._room():
            self._take()
            return
        if self._queued >= self.max_queue:
            self._make_room(tier)
        waiter = Waiter(asyncio.get_running_loop().create_future(), tier, tenant)
        self._waiters[tier].append(waiter)
        self._queued += 1
        self._queued_gauge.set(self._queued)
        wait_s = min(timeout, self.queue_timeout_s)
        try:
            # not asyncio.wait_for: on 3.11 it swallows a cancellation that races with the result
            async with asyncio.timeout(wait_s):
                await waiter.future
        except BaseException as exc:
            if waiter.shed:
                raise  # already out of the queue (FlexShed)
            if waiter.future.done() and not waiter.future.cancelled():
                # the slot was handed over just as the wait ended: give it back to the next waiter
                self.release()
            else:
                waiter.future.cancel()
                self._discard(waiter)
            if isinstance(exc, TimeoutError):
                SHED.labels(self.model, "queue_timeout").inc()
                raise self._refusal(tier, f"no capacity within {wait_s:.3g}s") from None
            raise

    def _make_room(self, tier: str) -> None:
        """The queue is full: refuse a flex request; for another tier, shed the newest flex waiter (or refuse)."""
        flex = self._waiters[wire.FLEX_TIER]
        if tier == wire.FLEX_TIER or not flex:
            SHED.labels(self.model, "queue_full").inc()
            raise self._refusal(tier, f"{self.running} requests running, {self._queued} waiting")
        victim = flex.pop()
        self._queued -= 1
        victim.shed = True
        SHED.labels(self.model, "flex_shed").inc()
        victim.future.set_exception(self._refusal(wire.FLEX_TIER, "a request of a higher tier took its place"))

    def _refusal(self, tier: str, why: str) -> Overloaded:
        if tier == wire.FLEX_TIER:
            return FlexShed(f"The model `{self.model}` has no capacity for flex requests now ({why}). Please retry "
                            "after a short wait, or use the default tier.", retry_after_s=self.retry_after_s)
        return Overloaded(f"The model `{self.model}` is overloaded ({why}). Please retry after a short wait.",
                          retry_after_s=self.retry_after_s)

    def release(self) -> None:
        self.running -= 1
        self._wake()

    def wake(self) -> None:
        """Let waiters in after capacity grew (a replica came back)."""
        self._wake()

    def _take(self) -> None:
        self.running += 1
        self._running_gauge.set(self.running)

    def _next(self) -> Waiter | None:
        """The waiter to let in next: the first of the highest tier that has one."""
        for tier in TIERS:
            if self._waiters[tier]:
                return self._waiters[tier].popleft()
        return None

    def _wake(self) -> None:
        while self._queued and self._room():
            waiter = self._next()
            assert waiter is not None, "the count says a waiter is queued"
            self._queued -= 1
            if waiter.future.done():
                continue
            self._take()  # the slot passes straight to the waiter: no one can jump the queue
            waiter.future.set_result(None)
        self._running_gauge.set(self.running)
        self._queued_gauge.set(self._queued)

    def _discard(self, waiter: Waiter) -> None:
        try:
            self._waiters[waiter.tier].remove(waiter)
            self._queued -= 1
        except ValueError:
            pass
        self._queued_gauge.set(self._queued)


class Capacity:
    """The gates of all models, sized from the replica set (``serving(model)``: replicas that can take it)."""

    def __init__(self, serving: Callable[[str], int], *, per_replica: Callable[[str], int],
                 max_queue: Callable[[str], int], queue_timeout_s: Callable[[str], float]) -> None:
        self._serving = serving
        self._per_replica = per_replica
        self._max_queue = max_queue
        self._queue_timeout_s = queue_timeout_s
        self._gates: dict[str, ModelGate] = {}

    def gate(self, model: str) -> ModelGate:
        gate = self._gates.get(model)
        if gate is None:
            gate = self._gates[model] = ModelGate(
                model, lambda: self._per_replica(model) * self._serving(model), max_queue=self._max_queue(model),
                queue_timeout_s=self._queue_timeout_s(model))
        return gate

    def refresh(self) -> None:
        """Re-read every gate's queue settings (the catalog changed) and let waiters in."""
        for model, gate in self._gates.items():
            gate.max_queue, gate.queue_timeout_s = self._max_queue(model), self._queue_timeout_s(model)
            gate.wake()

    def wake_all(self) -> None:
        for gate in self._gates.values():
            gate.wake()
