"""Admission: may this key run this request now? Scope and model access, rate limits, budget — before any work.

``Admission.admit`` (after the prompt is encoded, before an executor is called):
1. the key needs the ``inference`` scope, and the model must be one it may use (PermissionDenied);
2. rate limits: one request and ``prompt_tokens + max_tokens`` tokens against the key's per-minute limits
   (``AdmissionRefused``: RESOURCE_EXHAUSTED with ``retry-after`` and ``x-ratelimit-*`` metadata); once per request
   however many models its fallback chain tries (``Counted``: a fallback's admission counts no second request, and
   its tokens replace the earlier model's);
3. budget: when the key or its tenant has one, metering reserves the worst-case cost (prompt + max_tokens at
   the current price) atomically (``AdmissionRefused`` with ``x-inferplane-error-code: insufficient_quota``);
   metering unreachable means no budget check, so the request is refused (UNAVAILABLE): money fails closed.
``Admission.settle`` prices the actual tokens at the price the request was admitted with. The reservation is
settled by metering when the request's usage record arrives (in the ledger write's own transaction), so it is
exactly once, and a crashed router's reservations expire (TTL in metering).

A request does not call these steps itself: its ``Lease`` (``lease.py``) admits it on entry and settles, stamps
and records, or releases, on exit.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal

import grpc
from prometheus_client import Counter

from inferplane.common import wire
from inferplane.common.catalog import Catalog, CatalogModel
from inferplane.common.errors import PermissionDenied, ResourceExhausted, Unavailable
from inferplane.common.money import PriceNanos
from inferplane.common.wire import REASON_INSUFFICIENT_QUOTA, REASON_RATE_LIMITED
from inferplane.router.clients import KeyInfo, MeteringClient
from inferplane.router.ratelimit import Decision, Limits, RateLimiter
from inferplane.v1 import common_pb2, metering_pb2

log = logging.getLogger(__name__)

REFUSALS = Counter("inferplane_router_admission_refusals", "Requests refused at admission, by reason",
                   ["reason"])
Metadata = tuple[tuple[str, str], ...]


class AdmissionRefused(ResourceExhausted):
    """RESOURCE_EXHAUSTED with the metadata to send with it (rate-limit headers, the error code)."""

    def __init__(self, message: str, *, reason: wire.Reason, metadata: Metadata) -> None:
        super().__init__(message, reason=reason, metadata=metadata)


@dataclass(slots=True)
class Counted:
    """What one request has counted against its key's rate limits so far: one per request, shared by the
    admissions of the models its fallback chain tries, so the request counts once and its tokens are those of the
    last model admitted (the one that serves)."""

    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted request: the price it is charged at, what it holds of its budget, the headers to send."""

    key: KeyInfo
    model: str
    reservation_id: str  # "" when nothing is held (no budget)
    reserved_nanos: int
    price: PriceNanos | None  # None: the model is not priced
    headers: Metadata  # x-ratelimit-* of the admitting decision (empty when the key has no limits)
    tier: str = wire.DEFAULT_TIER  # the service tier it is served and billed at
    multiplier: Decimal = Decimal(1)  # that tier's price multiplier (the catalog's, at admission)

    @property
    def price_version(self) -> int:
        return self.price.version if self.price is not None else 0


def price_from_pb(pb: metering_pb2.Price) -> PriceNanos:
    cached = pb.cached_input_per_million_nanodollars if pb.HasField("cached_input_per_million_nanodollars") else None
    return PriceNanos(pb.input_per_million_nanodollars, pb.output_per_million_nanodollars,
                      pb.per_request_nanodollars, pb.version, cached)


class PriceBook:
    """Current prices: metering's (ListPrices, refreshed at most every ``ttl_s``), else the catalog's seed price
    (version 0: metering charges the price in force when the request was accepted)."""

    def __init__(self, metering: MeteringClient, catalog: Catalog | None = None, *, ttl_s: float = 10.0,
                 timeout_s: float = 1.0) -> None:
        self._metering = metering
        self._seeds = {m.id: m.prices.nanos() for m in (catalog.models if catalog else []) if m.prices is not None}
        self._prices: dict[str, PriceNanos] = {}
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._fresh_until = 0.0
        self._lock = asyncio.Lock()

    def reseed(self, catalog: Catalog) -> None:
        """The catalog changed: take its seed prices and ask metering again at the next look."""
        self._seeds = {m.id: m.prices.nanos() for m in catalog.models if m.prices is not None}
        self._fresh_until = 0.0

    def peek(self, model_id: str) -> PriceNanos | None:
        """The price known now, without asking metering (for ``ListModels``)."""
        return self._prices.get(model_id) or self._seeds.get(model_id)

    def update(self, model_id: str, price: PriceNanos) -> None:
        if price.version >= self._prices.get(model_id, PriceNanos()).version:
            self._prices[model_id] = price

    async def get(self, model_id: str) -> PriceNanos | None:
        await self.ensure_fresh()
        return self.peek(model_id)

    async def ensure_fresh(self) -> None:
        """Ask metering again when the table is older than ``ttl_s`` (a failure keeps the last known prices)."""
        if time.monotonic() >= self._fresh_until:
            await self.refresh()

    async def refresh(self) -> None:
        async with self._lock:
            if time.monotonic() < self._fresh_until:
                return  # another request refreshed it while this one waited
            try:
                prices = await self._metering.list_prices(timeout=self._timeout_s)
            except grpc.aio.AioRpcError as exc:
                log.warning("prices not refreshed from metering (%s); using the last known", exc.code().name)
                self._fresh_until = time.monotonic() + min(self._ttl_s, 2.0)
                return
            self._prices = {p.model: price_from_pb(p) for p in prices}
            self._fresh_until = time.monotonic() + self._ttl_s

    def pricing_pb(self, model_id: str) -> common_pb2.ModelPricing | None:
        price = self.peek(model_id)
        if price is None:
            return None
        return common_pb2.ModelPricing(input_per_million_nanodollars=price.input_per_million,
                                       output_per_million_nanodollars=price.output_per_million,
                                       per_request_nanodollars=price.per_request, version=price.version,
                                       cached_input_per_million_nanodollars=price.cached_input)


class Admission:
    def __init__(self, metering: MeteringClient, limiter: RateLimiter, prices: PriceBook, *,
                 timeout_s: float = 2.0) -> None:
        self._metering = metering
        self._limiter = limiter
        self.prices = prices
        self._timeout_s = timeout_s

    async def admit(self, key: KeyInfo, model: CatalogModel, prompt_tokens: int, max_tokens: int, *,
                    request_id: str | None = None, tier: str = wire.DEFAULT_TIER,
                    counted: Counted | None = None) -> Ticket:
        """Admit the request or raise (PermissionDenied, ``AdmissionRefused``, Unavailable). ``request_id`` names
        the reservation (and must be the usage record's request id). ``tier``: the service tier, priced at the
        model's price times its ``tier_multipliers`` entry (the budget reservation too). ``counted``: what this
        request's earlier admissions (models of its fallback chain that could not serve) counted against the rate
        limits; only the difference is counted now (no second request; the tokens of this model, not of both)."""
        multiplier = model.multiplier(tier)
        if "inference" not in key.scopes:
            raise PermissionDenied("This API key lacks the 'inference' scope (an admin key cannot run models).")
        if not key.may_use(model.id):
            raise PermissionDenied(f"This API key may not use the model `{model.id}`.", param="model")
        counted = counted if counted is not None else Counted()
        tokens = prompt_tokens + max_tokens
        decision = await self._limiter.check(
            key.key_id, requests=1 - counted.requests, tokens=tokens - counted.tokens,
            limits=Limits(key.requests_per_minute, key.tokens_per_minute))
        if not decision.allowed:
            REFUSALS.labels("rate_limit").inc()
            raise AdmissionRefused(_rate_message(decision, tokens), reason=REASON_RATE_LIMITED,
                                   metadata=decision.headers())
        counted.requests, counted.tokens = 1, tokens
        headers = decision.headers()
        if not key.has_budget:
            return Ticket(key, model.id, "", 0, await self.prices.get(model.id), headers, tier, multiplier)
        reservation_id = request_id or uuid.uuid4().hex
        try:
            held = await self._metering.reserve(reservation_id=reservation_id, key_id=key.key_id, model=model.id,
                                                prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                                                multiplier=multiplier, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                REFUSALS.labels("budget").inc()
                raise AdmissionRefused(exc.details() or "You exceeded your current quota.",
                                       reason=REASON_INSUFFICIENT_QUOTA, metadata=headers) from None
            log.warning("budget reservation failed (%s): refusing, budgets fail closed", exc.code().name)
            raise Unavailable("Budgets cannot be checked right now. Please retry.") from None
        price = price_from_pb(held.price) if held.HasField("price") else None
        if price is not None:
            self.prices.update(model.id, price)
        return Ticket(key, model.id, reservation_id if held.reserved_nanodollars else "", held.reserved_nanodollars,
                      price, headers, tier, multiplier)

    def settle(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        """The request's cost in nano-dollars at the price it was admitted with (no I/O, never suspends: it runs
        in the lease's exit before the usage record is on its way). The budget is settled by the
        usage record (``stamp`` it with this cost and the ticket): exactly once, in metering's ledger write."""
        if ticket.price is None:
            return 0
        return ticket.price.cost(prompt_tokens, completion_tokens, cached_tokens, multiplier=ticket.multiplier)

    async def release(self, ticket: Ticket) -> None:
        """Give the reservation back when the request will leave no usage record (best effort: the TTL is the
        backstop)."""
        if not ticket.reservation_id:
            return
        try:
            await self._metering.release(ticket.reservation_id, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("reservation %s not released (%s); it expires by itself", ticket.reservation_id,
                        exc.code().name)


def stamp(record: metering_pb2.UsageRecord, ticket: Ticket, cost_nanos: int) -> metering_pb2.UsageRecord:
    """Put the admission's facts on the request's usage record: tenant, price version, cost, reservation."""
    record.tenant_id = ticket.key.tenant_id
    record.price_version = ticket.price_version
    record.reservation_id = ticket.reservation_id
    record.service_tier = ticket.tier
    if ticket.multiplier != 1:
        record.tier_multiplier = str(ticket.multiplier)
    if ticket.price is not None:
        record.cost_nanodollars = cost_nanos
    return record


def _rate_message(decision: Decision, tokens: int) -> str:
    if decision.exceeded == "tokens":
        if decision.retry_after_s is None:
            return (f"Request too large: it needs {tokens} tokens (prompt + max_tokens) and this key's limit is "
                    f"{decision.limit_tokens} tokens per minute. Reduce the prompt or max_tokens.")
        return (f"Rate limit reached for tokens per minute (limit {decision.limit_tokens}). Please try again in "
                f"{decision.retry_after_s:.3g}s.")
    return (f"Rate limit reached for requests per minute (limit {decision.limit_requests}). Please try again in "
            f"{(decision.retry_after_s or 0):.3g}s.")
