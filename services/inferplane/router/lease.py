"""One request's life in the router, from admission to its usage record, in one object.

``Lease`` is an async context manager. Entering it admits the request (scope, rate limits, budget: see
``admission.py``) and takes a slot of the model's bounded queue (``capacity.py``). The request then tells it
what happens: ``began()`` when an executor is asked to work, ``tokens(n)`` as tokens arrive, ``finished(...)``
with the model's own counts. Leaving it gives the queue slot back and then either

- writes exactly one usage record, settled at the admitted price and stamped with the reservation, when an
  executor was asked to work (even if the caller was cancelled at any point: the record is started, from a
  task of its own, before anything on the way out awaits); or
- gives the budget reservation back, when no executor was asked (nothing was generated, nothing is owed).

A request that finished (``stop`` or ``length``) waits, shielded, until its record is stored: its usage and
cost reach the caller only once they are in the ledger's outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from types import TracebackType

from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from inferplane.common.catalog import CatalogModel
from inferplane.common.wire import CANCELLED, DEFAULT_TIER, ERROR, FINISH_TO_PB, LENGTH, STOP
from inferplane.router import metrics
from inferplane.router.admission import Admission, Counted, Metadata, Ticket, stamp
from inferplane.router.capacity import ModelGate
from inferplane.router.clients import KeyInfo
from inferplane.router.usage import UsageRecorder, current_trace_id, usage_record
from inferplane.v1 import metering_pb2


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


@dataclass(slots=True)
class Clock:
    """When a request started, and the monotonic time by which it must end (its deadline)."""

    end: float
    started: float = field(default_factory=time.monotonic)
    created_at: Timestamp = field(default_factory=_now)

    @classmethod
    def start(cls, deadline: float | None, limit_s: float) -> Clock:
        """The caller's deadline, capped by ``limit_s`` from now (the model's, else the router's, limit)."""
        started = time.monotonic()
        return cls(min(deadline or float("inf"), started + limit_s), started)

    def left(self) -> float:
        """Seconds until the deadline (a little above zero once it passed, so a call fails as DEADLINE_EXCEEDED)."""
        return max(0.001, self.end - time.monotonic())


def trace_request(operation: str, model: str, request_id: str, key: KeyInfo) -> trace.Span:
    span = trace.get_current_span()
    span.set_attributes({"gen_ai.operation.name": operation, "gen_ai.request.model": model,
                         "inferplane.request_id": request_id, "inferplane.key_id": key.key_id})
    return span


class Lease:
    def __init__(self, admission: Admission | None, gate: ModelGate, recorder: UsageRecorder, *, key: KeyInfo,
                 model: CatalogModel, request_id: str, operation: str, clock: Clock, prompt_tokens: int,
                 max_tokens: int, tier: str = DEFAULT_TIER, counted: Counted | None = None) -> None:
        """``counted``: what the request's earlier leases (models of its fallback chain) counted against the key's
        rate limits, shared so that the request counts once (``Admission.admit``)."""
        self._admission = admission
        self._counted = counted
        self._gate = gate
        self._recorder = recorder
        self.key, self.model, self.request_id, self.operation, self.clock = key, model, request_id, operation, clock
        self.max_tokens = max_tokens
        self.tier = tier  # the service tier: its place in the model's queue, its price
        self.ticket: Ticket | None = None
        self.working = False  # an executor was asked: the request leaves a usage record
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.cached_tokens = 0  # of prompt_tokens, those the model reused from its prefix cache
        self.finish: str | None = None  # one of wire.FINISH_REASONS once known
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.cost: int | None = None  # set on leaving: nano-dollars at the admitted price (None: not priced)
        self._entered = False

    @property
    def headers(self) -> Metadata:
        """The rate-limit headers of the admitting decision (empty without limits or admission)."""
        return self.ticket.headers if self.ticket is not None else ()

    @property
    def finish_pb(self) -> int:
        return FINISH_TO_PB[self.finish or ERROR]

    def began(self) -> None:
        """An executor is asked to work (called just before each attempt's call): a usage record is owed."""
        self.working = True

    def tokens(self, n: int) -> None:
        """``n`` generated tokens arrived."""
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
            trace.get_current_span().add_event("gen_ai.first_token")
        self.last_token_at = now
        self.completion_tokens += n
        self._gate.served(self.key.tenant_id, n)  # the tenant's served tokens (the fair queue's count)

    def finished(self, reason: str, *, prompt_tokens: int | None = None, completion_tokens: int | None = None,
                 cached_tokens: int = 0) -> None:
        """The work ended with ``reason``; counts given here (the model's own) replace the router's."""
        self.cached_tokens = cached_tokens
        self.working = True
        self.finish = reason
        if prompt_tokens is not None:
            self.prompt_tokens = prompt_tokens
        if completion_tokens is not None:
            self.completion_tokens = completion_tokens

    async def __aenter__(self) -> Lease:
        assert not self._entered, "a lease is entered once: one request, one usage record"
        self._entered = True
        if self._admission is not None:  # raises PermissionDenied, AdmissionRefused (429) or Unavailable
            self.ticket = await self._admission.admit(self.key, self.model, self.prompt_tokens, self.max_tokens,
                                                      request_id=self.request_id, tier=self.tier,
                                                      counted=self._counted)
        try:
            # Overloaded (503) when the queue is full or too slow; a flex request: FlexShed (429)
            await self._gate.acquire(self.clock.left(), tier=self.tier, tenant=self.key.tenant_id,
                                     tokens=self.prompt_tokens)
        except BaseException:
            await self._release()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.finish is None:
            gone = exc_type is not None and issubclass(exc_type, asyncio.CancelledError | GeneratorExit)
            self.finish = CANCELLED if gone else ERROR
        # Everything up to record_soon is synchronous: no cancellation can fall between the slot's release and
        # the record's task.
        self._gate.release()
        if not self.working:
            await self._release()
            return
        recording = self._recorder.record_soon(self._settled_record())
        self._observe()
        if self.finish in (STOP, LENGTH):
            # a completed request's usage (and cost) reaches the caller only once its record is stored
            await asyncio.shield(recording)

    def _settled_record(self) -> metering_pb2.UsageRecord:
        record = usage_record(self.request_id, self.key, self.model.id, self.prompt_tokens, self.completion_tokens,
                              self.finish or ERROR, self.clock.started, self.first_token_at, self.clock.created_at)
        record.model_version = self.model.version  # the version that served it (its catalog entry's, at the start)
        record.trace_id = current_trace_id()
        record.cached_tokens = self.cached_tokens
        record.service_tier = self.tier
        if self.ticket is not None and self._admission is not None:
            cost = self._admission.settle(self.ticket, self.prompt_tokens, self.completion_tokens, self.cached_tokens)
            stamp(record, self.ticket, cost)  # the record settles the reservation in metering, exactly once
            self.cost = cost if self.ticket.price is not None else None
        return record

    def _observe(self) -> None:
        started = self.clock.started
        trace.get_current_span().set_attributes({
            "gen_ai.usage.input_tokens": self.prompt_tokens, "gen_ai.usage.output_tokens": self.completion_tokens,
            "gen_ai.usage.cache_read.input_tokens": self.cached_tokens,
            "gen_ai.response.finish_reasons": [self.finish or ERROR]})
        metrics.observe(self.model.id, self.operation, self.finish or ERROR, prompt_tokens=self.prompt_tokens,
                        completion_tokens=self.completion_tokens, cached_tokens=self.cached_tokens,
                        ttft_s=None if self.first_token_at is None else self.first_token_at - started,
                        duration_s=time.monotonic() - started,
                        last_token_s=None if self.last_token_at is None else self.last_token_at - started)

    async def _release(self) -> None:
        """Give back a reservation of a request that leaves no usage record (best effort: metering's TTL is the
        backstop)."""
        if self.ticket is not None and self._admission is not None:
            with contextlib.suppress(Exception):
                await self._admission.release(self.ticket)
