"""The metering gRPC servicer: protobuf in, plain store call (in a thread), protobuf out.

The router's calls (VerifyKey, Reserve, Release, ListPrices, RecordUsage, RecordUsageBatch) are mesh-internal
and carry no credentials. Admin calls carry the caller's key in ``authorization`` metadata and need the ``admin``
scope. The usage reads (GetUsageSummary, ListUsage) need a valid key too: an admin key may read and filter any
key's or tenant's usage; any other key reads its own usage only, whatever key or tenant it asks for.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
from prometheus_client import Counter, Histogram

from inferplane.common import wire
from inferplane.common.errors import InvalidArgument, PermissionDenied
from inferplane.common.money import MoneyError, PriceNanos
from inferplane.common.server import caller_key
from inferplane.metering.catalog_db import ModelEntry
from inferplane.metering.convert import (
    amounts_from_pb,
    budget_to_pb,
    dt,
    key_to_pb,
    model_to_pb,
    multiplier_from_pb,
    optional_cached_input,
    period_name,
    price_to_pb,
    scope_name,
    spec_from_json,
    summary_to_pb,
    ts,
    usage_from_pb,
    usage_to_pb,
    verify_to_pb,
)
from inferplane.metering.store import (
    DEFAULT_USAGE_LIMIT,
    MAX_BATCH,
    BudgetExceeded,
    KeyInfo,
    MeteringStore,
    UsageRow,
)
from inferplane.v1 import metering_pb2, metering_pb2_grpc

__all__ = ["MeteringServicer", "usage_from_pb", "usage_to_pb"]

RECORDS = Counter("inferplane_metering_usage_records", "Usage records received, by result (created/duplicate/"
                  "invalid)", ["result"])
INGEST_LAG = Histogram("inferplane_metering_ingest_lag_seconds",
                       "From request acceptance (the record's created_at) to the ledger write",
                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600))
RESERVATIONS = Counter("inferplane_metering_reservations", "Budget reservations, by result (held/refused/none)",
                       ["result"])
DEFAULT_SUMMARY_DAYS = 30


class MeteringServicer(metering_pb2_grpc.MeteringServiceServicer):
    """``inferplane.v1.MeteringService`` over a ``MeteringStore``."""

    def __init__(self, store: MeteringStore) -> None:
        self._store = store

    async def _caller(self, context: grpc.aio.ServicerContext) -> KeyInfo:
        return await asyncio.to_thread(self._store.verify_key, caller_key(context.invocation_metadata()))

    async def _admin(self, context: grpc.aio.ServicerContext) -> KeyInfo:
        caller = await self._caller(context)
        if not caller.is_admin:
            raise PermissionDenied("This API key lacks the 'admin' scope.")
        return caller

    # -- the router's calls --

    async def VerifyKey(self, request: metering_pb2.VerifyKeyRequest,
                        context: grpc.aio.ServicerContext) -> metering_pb2.VerifyKeyResponse:
        info = await asyncio.to_thread(self._store.verify_key, request.api_key)
        has_budget = await asyncio.to_thread(self._store.has_budget, info.key_id, info.tenant_id)
        return verify_to_pb(info, has_budget=has_budget)

    async def RecordUsage(self, request: metering_pb2.RecordUsageRequest,
                          context: grpc.aio.ServicerContext) -> metering_pb2.RecordUsageResponse:
        if not request.HasField("record"):
            raise InvalidArgument("record is required", param="record")
        row = usage_from_pb(request.record)
        [result] = await asyncio.to_thread(self._store.record_usage_batch, [row])
        _observe([row], [result.created])
        return metering_pb2.RecordUsageResponse(created=result.created, cost_nanodollars=result.cost_nanos)

    async def RecordUsageBatch(self, request: metering_pb2.RecordUsageBatchRequest,
                               context: grpc.aio.ServicerContext) -> metering_pb2.RecordUsageBatchResponse:
        if len(request.records) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} records per batch", param="records")
        rows: list[UsageRow] = []
        errors: dict[int, str] = {}
        for i, pb in enumerate(request.records):
            try:
                rows.append(usage_from_pb(pb))
            except InvalidArgument as exc:  # one bad record must not hold the others back (nor be retried)
                errors[i] = exc.message
        results = iter(await asyncio.to_thread(self._store.record_usage_batch, rows))
        outcomes: list[metering_pb2.RecordOutcome] = []
        created: list[bool] = []
        for i in range(len(request.records)):
            if i in errors:
                outcomes.append(metering_pb2.RECORD_OUTCOME_INVALID)
                continue
            result = next(results)
            created.append(result.created)
            outcomes.append(metering_pb2.RECORD_OUTCOME_CREATED if result.created
                            else metering_pb2.RECORD_OUTCOME_DUPLICATE)
        RECORDS.labels("invalid").inc(len(errors))
        _observe(rows, created)
        return metering_pb2.RecordUsageBatchResponse(
            outcomes=outcomes, errors=[errors.get(i, "") for i in range(len(request.records))])

    async def Reserve(self, request: metering_pb2.ReserveRequest,
                      context: grpc.aio.ServicerContext) -> metering_pb2.ReserveResponse:
        try:
            held = await asyncio.to_thread(self._store.reserve, request.reservation_id, request.key_id,
                                           request.model, request.prompt_tokens, request.max_tokens,
                                           multiplier_from_pb(request.tier_multiplier))
        except BudgetExceeded:
            RESERVATIONS.labels("refused").inc()
            raise
        except Exception:
            RESERVATIONS.labels("refused").inc()
            raise
        RESERVATIONS.labels("held" if held.reserved_nanos else "none").inc()
        reply = metering_pb2.ReserveResponse(reserved_nanodollars=held.reserved_nanos)
        if held.price is not None:
            reply.price.CopyFrom(price_to_pb(held.price))
        return reply

    async def Release(self, request: metering_pb2.ReleaseRequest,
                      context: grpc.aio.ServicerContext) -> metering_pb2.ReleaseResponse:
        released = await asyncio.to_thread(self._store.release, request.reservation_id)
        return metering_pb2.ReleaseResponse(released=released)

    async def ListPrices(self, request: metering_pb2.ListPricesRequest,
                         context: grpc.aio.ServicerContext) -> metering_pb2.ListPricesResponse:
        if request.include_history:
            prices = await asyncio.to_thread(self._store.price_history)
        else:
            prices = sorted((await asyncio.to_thread(self._store.current_prices)).values(), key=lambda p: p.model)
        return metering_pb2.ListPricesResponse(prices=[price_to_pb(p) for p in prices])

    # -- callers with a key --

    async def ListUsage(self, request: metering_pb2.ListUsageRequest,
                        context: grpc.aio.ServicerContext) -> metering_pb2.ListUsageResponse:
        caller = await self._caller(context)
        if caller.is_admin:
            key_id = request.key_id if request.HasField("key_id") else None
            tenant_id = request.tenant_id if request.HasField("tenant_id") else None
        else:  # a key reads its own records and nothing else, whatever it asks for
            key_id, tenant_id = caller.key_id, caller.tenant_id
        limit = request.limit or DEFAULT_USAGE_LIMIT  # the store refuses negative and over-large limits
        rows = await asyncio.to_thread(
            lambda: self._store.list_usage(key_id, limit, tenant_id=tenant_id,
                                           start=dt(request.start) if request.HasField("start") else None,
                                           end=dt(request.end) if request.HasField("end") else None))
        return metering_pb2.ListUsageResponse(records=[usage_to_pb(r) for r in rows])

    async def GetUsageSummary(self, request: metering_pb2.GetUsageSummaryRequest,
                              context: grpc.aio.ServicerContext) -> metering_pb2.GetUsageSummaryResponse:
        caller = await self._caller(context)
        end = dt(request.end) if request.HasField("end") else datetime.now(UTC)
        start = dt(request.start) if request.HasField("start") else end - timedelta(days=DEFAULT_SUMMARY_DAYS)
        if caller.is_admin:
            key_id = request.key_id if request.HasField("key_id") else None
            tenant_id = request.tenant_id if request.HasField("tenant_id") else None
        else:  # a key reads its own usage and nothing else, whatever it asks for
            key_id, tenant_id = caller.key_id, caller.tenant_id
        rows = await asyncio.to_thread(lambda: self._store.usage_summary(start=start, end=end, key_id=key_id,
                                                                         tenant_id=tenant_id))
        return metering_pb2.GetUsageSummaryResponse(rows=[summary_to_pb(r) for r in rows], start=ts(start),
                                                    end=ts(end))

    async def WhoAmI(self, request: metering_pb2.WhoAmIRequest,
                     context: grpc.aio.ServicerContext) -> metering_pb2.ApiKeyInfo:
        return key_to_pb(await self._caller(context))

    # -- admin --

    async def CreateKey(self, request: metering_pb2.CreateKeyRequest,
                        context: grpc.aio.ServicerContext) -> metering_pb2.CreateKeyResponse:
        await self._admin(context)
        info, plain = await asyncio.to_thread(
            lambda: self._store.create_key(
                request.name, tenant_id=request.tenant_id, models=list(request.models),
                scopes=list(request.scopes) or None,
                expires_at=dt(request.expires_at) if request.HasField("expires_at") else None,
                requests_per_minute=request.requests_per_minute if request.HasField("requests_per_minute") else None,
                tokens_per_minute=request.tokens_per_minute if request.HasField("tokens_per_minute") else None))
        if request.HasField("budget"):
            await asyncio.to_thread(self._store.set_budget, wire.SCOPE_KEY, info.key_id,
                                    request.budget.limit_nanodollars, period_name(request.budget.period))
        return metering_pb2.CreateKeyResponse(key=key_to_pb(info), api_key=plain)

    async def ListKeys(self, request: metering_pb2.ListKeysRequest,
                       context: grpc.aio.ServicerContext) -> metering_pb2.ListKeysResponse:
        await self._admin(context)
        tenant = request.tenant_id if request.HasField("tenant_id") else None
        keys = await asyncio.to_thread(self._store.list_keys, tenant)
        return metering_pb2.ListKeysResponse(keys=[key_to_pb(k) for k in keys])

    async def RevokeKey(self, request: metering_pb2.RevokeKeyRequest,
                        context: grpc.aio.ServicerContext) -> metering_pb2.ApiKeyInfo:
        await self._admin(context)
        return key_to_pb(await asyncio.to_thread(self._store.revoke_key, request.key_id))

    async def SetPrice(self, request: metering_pb2.SetPriceRequest,
                       context: grpc.aio.ServicerContext) -> metering_pb2.Price:
        await self._admin(context)
        try:
            price = PriceNanos(request.input_per_million_nanodollars, request.output_per_million_nanodollars,
                               request.per_request_nanodollars,
                               cached_input_per_million=optional_cached_input(request))
        except MoneyError as exc:
            raise InvalidArgument(str(exc), param="price") from None
        return price_to_pb(await asyncio.to_thread(self._store.set_price, request.model, price))

    async def SetBudget(self, request: metering_pb2.SetBudgetRequest,
                        context: grpc.aio.ServicerContext) -> metering_pb2.Budget:
        await self._admin(context)
        info = await asyncio.to_thread(self._store.set_budget, scope_name(request.scope), request.subject_id,
                                       request.limit_nanodollars, period_name(request.period))
        return budget_to_pb(info)

    async def ListBudgets(self, request: metering_pb2.ListBudgetsRequest,
                          context: grpc.aio.ServicerContext) -> metering_pb2.ListBudgetsResponse:
        await self._admin(context)
        scope = None if request.scope == metering_pb2.BUDGET_SCOPE_UNSPECIFIED else scope_name(request.scope)
        return metering_pb2.ListBudgetsResponse(
            budgets=[budget_to_pb(b) for b in await asyncio.to_thread(self._store.list_budgets, scope)])

    # -- the model catalog --

    async def ListCatalog(self, request: metering_pb2.ListCatalogRequest,
                          context: grpc.aio.ServicerContext) -> metering_pb2.ListCatalogResponse:
        version = await asyncio.to_thread(self._store.catalog_version)
        if request.if_newer_than and version <= request.if_newer_than:  # the routers' poll: one cheap read
            return metering_pb2.ListCatalogResponse(version=version, unchanged=True)
        version, models = await asyncio.to_thread(self._store.catalog)
        prices = await asyncio.to_thread(self._store.current_prices)
        return metering_pb2.ListCatalogResponse(version=version,
                                                models=[model_to_pb(m, prices.get(m.id)) for m in models])

    async def CreateModel(self, request: metering_pb2.CreateModelRequest,
                          context: grpc.aio.ServicerContext) -> metering_pb2.ModelChange:
        await self._admin(context)
        price = amounts_from_pb(request.price) if request.HasField("price") else None
        entry, version = await asyncio.to_thread(self._store.create_model, request.id,
                                                 spec_from_json(request.spec_json), dict(request.versions),
                                                 request.version, price)
        return await self._change(entry, version)

    async def UpdateModel(self, request: metering_pb2.UpdateModelRequest,
                          context: grpc.aio.ServicerContext) -> metering_pb2.ModelChange:
        await self._admin(context)
        price = amounts_from_pb(request.price) if request.HasField("price") else None
        entry, version = await asyncio.to_thread(
            lambda: self._store.update_model(request.id, spec=spec_from_json(request.spec_json),
                                             versions=dict(request.versions),
                                             remove_versions=tuple(request.remove_versions),
                                             serving=request.version if request.HasField("version") else None,
                                             price=price))
        return await self._change(entry, version)

    async def DeleteModel(self, request: metering_pb2.DeleteModelRequest,
                          context: grpc.aio.ServicerContext) -> metering_pb2.ModelChange:
        await self._admin(context)
        entry, version = await asyncio.to_thread(self._store.delete_model, request.id)
        return await self._change(entry, version)

    async def _change(self, entry: ModelEntry, version: int) -> metering_pb2.ModelChange:
        price = await asyncio.to_thread(self._store.current_price, entry.id)
        return metering_pb2.ModelChange(model=model_to_pb(entry, price), catalog_version=version)


def _observe(rows: list[UsageRow], created: list[bool]) -> None:
    now = datetime.now(UTC)
    for row, fresh in zip(rows, created, strict=True):
        RECORDS.labels("created" if fresh else "duplicate").inc()
        if fresh:
            INGEST_LAG.observe(max(0.0, (now - row.created_at).total_seconds()))
