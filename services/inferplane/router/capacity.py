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
    """A request waiting for a slot: its future (a result: the slot is its), tier, tenant, prompt tokens (counted
    for its tenant when it is let in) and arrival number."""

    future: asyncio.Future[None]
    tier: str
    tenant: str
    tokens: int
    seq: int
    shed: bool = False  # pushed out of a full queue by a request of a higher tier


class ModelGate:
    """Slots plus a bounded queue of waiters for one model. ``capacity`` is read at every decision.

    Waiters are let in by tier (priority, then default, then flex). Within a tier, with ``fair`` (the default), the
    waiter of the tenant served least goes first (VTC, Sheng et al., OSDI '24: each tenant's served tokens are
    counted, prompt tokens when a request is let in and completion tokens as they arrive, ``served``; a tenant that
    starts waiting is lifted to the least count among the tenants already waiting, so time spent idle is no credit);
    ties and each tenant's own requests go in arrival order. Without ``fair``: arrival order within a tier.

    A full queue refuses a flex request (429, ``FlexShed``), and makes room for a default or priority one by shedding
    the newest flex waiter; with no flex waiter to shed, it refuses (503, ``Overloaded``). A flex request that waits
    too long is a 429 too. The counts are dropped whenever nothing waits (fairness is among waiting tenants), so they
    are bounded by the tenants of one busy period."""

    def __init__(self, model: str, capacity: Callable[[], int], *, max_queue: int, queue_timeout_s: float,
                 retry_after_s: float = 1.0, fair: bool = True) -> None:
        self.model = model
        self._capacity = capacity
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.fair = fair
        self.running = 0
        # tier -> tenant -> its waiters, oldest first (a tenant's entry goes when its last waiter leaves)
        self._waiters: dict[str, dict[str, deque[Waiter]]] = {tier: {} for tier in TIERS}
        self._queued = 0
        self._seq = 0
        self.counts: dict[str, int] = {}  # tenant -> tokens served (VTC's virtual counter)
        self._running_gauge = RUNNING.labels(model)
        self._queued_gauge = QUEUED.labels(model)

    @property
    def queued(self) -> int:
        return self._queued

    def _room(self) -> bool:
        return self.running < max(1, self._capacity())

    def served(self, tenant: str, tokens: int) -> None:
        """``tokens`` more were served to ``tenant`` (completion tokens as they arrive)."""
        if self._queued:
            self.counts[tenant] = self.counts.get(tenant, 0) + tokens

    async def acquire(self, timeout: float, *, tier: str = wire.DEFAULT_TIER, tenant: str = "",
                      tokens: int = 0) -> None:
        """Take a slot, waiting at most ``min(timeout, queue_timeout_s)`` in the queue; else ``Overloaded`` (a flex
        request: ``FlexShed``). ``tokens``: the request's prompt tokens, counted for ``tenant`` once let in."""
        if not self._queued and self._room():
            self._take()
            return
        if self._queued >= self.max_queue:
            self._make_room(tier)
        self._enqueue(waiter := Waiter(asyncio.get_running_loop().create_future(), tier, tenant, tokens, self._seq))
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

    def _enqueue(self, waiter: Waiter) -> None:
        self._seq += 1
        if self.fair and not any(waiter.tenant in tenants for tenants in self._waiters.values()):
            # a tenant that starts waiting: lifted to the least count of those already waiting (no idle credit)
            waiting = [self.counts.get(t, 0) for tenants in self._waiters.values() for t in tenants]
            if waiting:
                self.counts[waiter.tenant] = max(self.counts.get(waiter.tenant, 0), min(waiting))
        self._waiters[waiter.tier].setdefault(waiter.tenant, deque()).append(waiter)
        self._queued += 1
        self._queued_gauge.set(self._queued)

    def _make_room(self, tier: str) -> None:
        """The queue is full: refuse a flex request; for another tier, shed the newest flex waiter (or refuse)."""
        flex = self._waiters[wire.FLEX_TIER]
        if tier == wire.FLEX_TIER or not flex:
            SHED.labels(self.model, "queue_full").inc()
            raise self._refusal(tier, f"{self.running} requests running, {self._queued} waiting")
        tenant = max(flex, key=lambda t: flex[t][-1].seq)
        victim = flex[tenant].pop()
        if not flex[tenant]:
            del flex[tenant]
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
        """The waiter to let in next: in the highest tier that has one, the least-served tenant's oldest (fair),
        else the oldest."""
        for tier in TIERS:
            tenants = self._waiters[tier]
            if not tenants:
                continue
            if self.fair:
                tenant = min(tenants, key=lambda t: (self.counts.get(t, 0), tenants[t][0].seq))
            else:
                tenant = min(tenants, key=lambda t: tenants[t][0].seq)
            waiter = tenants[tenant].popleft()
            if not tenants[tenant]:
                del tenants[tenant]
            return waiter
        return None

    def _wake(self) -> None:
        while self._queued and self._room():
            waiter = self._next()
            assert waiter is not None, "the count says a waiter is queued"
            self._queued -= 1
            if waiter.future.done():
                continue
            self._take()  # the slot passes straight to the waiter: no one can jump the queue
            if self.fair:
                self.counts[waiter.tenant] = self.counts.get(waiter.tenant, 0) + waiter.tokens
            waiter.future.set_result(None)
        if not self._queued:
            self.counts.clear()
        self._running_gauge.set(self.running)
        self._queued_gauge.set(self._queued)

    def _discard(self, waiter: Waiter) -> None:
        tenants = self._waiters[waiter.tier]
        try:
            tenants[waiter.tenant].remove(waiter)
        except (KeyError, ValueError):
            pass
        else:
            self._queued -= 1
            if not tenants[waiter.tenant]:
                del tenants[waiter.tenant]
        if not self._queued:
            self.counts.clear()
        self._queued_gauge.set(self._queued)


class Capacity:
    """The gates of all models, sized from the replica set (``serving(model)``: replicas that can take it)."""

    def __init__(self, serving: Callable[[str], int], *, per_replica: Callable[[str], int],
                 max_queue: Callable[[str], int], queue_timeout_s: Callable[[str], float], fair: bool = True) -> None:
        self.fair = fair
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
                queue_timeout_s=self._queue_timeout_s(model), fair=self.fair)
        return gate

    def refresh(self) -> None:
        """Re-read every gate's queue settings (the catalog changed) and let waiters in."""
        for model, gate in self._gates.items():
            gate.max_queue, gate.queue_timeout_s = self._max_queue(model), self._queue_timeout_s(model)
            gate.wake()

    def wake_all(self) -> None:
        for gate in self._gates.values():
            gate.wake()
