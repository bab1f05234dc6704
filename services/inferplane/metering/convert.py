"""Protobuf ↔ the store's plain dataclasses, at the metering service's edge."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from inferplane.common import wire
from inferplane.common.catalog import parse_multiplier
from inferplane.common.errors import InvalidArgument
from inferplane.common.money import MoneyError, PriceNanos
from inferplane.metering.catalog_db import ModelEntry
from inferplane.metering.store import BudgetInfo, KeyInfo, PriceInfo, SummaryRow, UsageRow
from inferplane.v1 import metering_pb2


def ts(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


def dt(value: Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


def usage_from_pb(pb: metering_pb2.UsageRecord) -> UsageRow:
    """A ``UsageRow`` from the wire; ``InvalidArgument`` on bad values (checked by ``UsageRow``)."""
    created_at = dt(pb.created_at) if pb.HasField("created_at") else datetime.now(UTC)
    return UsageRow(
        request_id=pb.request_id, key_id=pb.key_id, model=pb.model, prompt_tokens=pb.prompt_tokens,
        completion_tokens=pb.completion_tokens, finish_reason=pb.finish_reason, latency_ms=pb.latency_ms,
        created_at=created_at,
        time_to_first_token_ms=pb.time_to_first_token_ms if pb.HasField("time_to_first_token_ms") else None,
        tenant_id=pb.tenant_id, cost_nanos=pb.cost_nanodollars if pb.HasField("cost_nanodollars") else None,
        price_version=pb.price_version, reservation_id=pb.reservation_id, cached=pb.cached,
        model_version=pb.model_version, trace_id=pb.trace_id,
        cached_tokens=pb.cached_tokens,
        service_tier=pb.service_tier, tier_multiplier=multiplier_from_pb(pb.tier_multiplier),
    )


def multiplier_from_pb(text: str) -> Decimal | None:
    """A service tier's price multiplier from the wire ("" : none); ``InvalidArgument`` when it is not one."""
    if not text:
        return None
    try:
        return parse_multiplier(text)
    except ValueError as exc:
        raise InvalidArgument(str(exc), param="tier_multiplier") from None


def usage_to_pb(row: UsageRow) -> metering_pb2.UsageRecord:
    pb = metering_pb2.UsageRecord(
        request_id=row.request_id, key_id=row.key_id, model=row.model, prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens, finish_reason=row.finish_reason, latency_ms=row.latency_ms,
        time_to_first_token_ms=row.time_to_first_token_ms, tenant_id=row.tenant_id,
        cost_nanodollars=row.cost_nanos, price_version=row.price_version, cached=row.cached,
        cancelled=row.cancelled, model_version=row.model_version, trace_id=row.trace_id,
        cached_tokens=row.cached_tokens, service_tier=row.service_tier,
    )
    pb.created_at.FromDatetime(row.created_at)
    return pb


def key_to_pb(info: KeyInfo) -> metering_pb2.ApiKeyInfo:
    pb = metering_pb2.ApiKeyInfo(key_id=info.key_id, name=info.name, tenant_id=info.tenant_id, models=info.models,
                                 scopes=info.scopes, requests_per_minute=info.requests_per_minute,
                                 tokens_per_minute=info.tokens_per_minute, created_at=ts(info.created_at))
    if info.expires_at is not None:
        pb.expires_at.CopyFrom(ts(info.expires_at))
    if info.revoked_at is not None:
        pb.revoked_at.CopyFrom(ts(info.revoked_at))
    return pb


def verify_to_pb(info: KeyInfo, *, has_budget: bool) -> metering_pb2.VerifyKeyResponse:
    pb = metering_pb2.VerifyKeyResponse(key_id=info.key_id, name=info.name, tenant_id=info.tenant_id,
                                        models=info.models, scopes=info.scopes,
                                        requests_per_minute=info.requests_per_minute,
                                        tokens_per_minute=info.tokens_per_minute, has_budget=has_budget)
    if info.expires_at is not None:
        pb.expires_at.CopyFrom(ts(info.expires_at))
    return pb


def price_to_pb(info: PriceInfo) -> metering_pb2.Price:
    p = info.price
    return metering_pb2.Price(model=info.model, input_per_million_nanodollars=p.input_per_million,
                              output_per_million_nanodollars=p.output_per_million,
                              per_request_nanodollars=p.per_request, version=p.version,
                              effective_at=ts(info.effective_at), source=info.source,
                              cached_input_per_million_nanodollars=p.cached_input_per_million)


def budget_to_pb(info: BudgetInfo) -> metering_pb2.Budget:
    return metering_pb2.Budget(scope=wire.BUDGET_SCOPES[info.scope], subject_id=info.subject_id,
                               limit_nanodollars=info.limit_nanos,
                               period=wire.BUDGET_PERIODS[info.period],
                               period_start=ts(info.period_start), spent_nanodollars=info.spent_nanos,
                               reserved_nanodollars=info.reserved_nanos)


def summary_to_pb(row: SummaryRow) -> metering_pb2.UsageSummaryRow:
    return metering_pb2.UsageSummaryRow(day=row.day, key_id=row.key_id, tenant_id=row.tenant_id, model=row.model,
                                        requests=row.requests, prompt_tokens=row.prompt_tokens,
                                        completion_tokens=row.completion_tokens, cost_nanodollars=row.cost_nanos,
                                        cancelled_requests=row.cancelled_requests,
                                        cached_tokens=row.cached_tokens, service_tier=row.service_tier)


def scope_name(value: int) -> str:
    try:
        return wire.BUDGET_SCOPE_NAMES[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument("scope must be BUDGET_SCOPE_KEY or BUDGET_SCOPE_TENANT", param="scope") from None


def period_name(value: int) -> str:
    if value == metering_pb2.BUDGET_PERIOD_UNSPECIFIED:
        return wire.DEFAULT_BUDGET_PERIOD
    try:
        return wire.BUDGET_PERIOD_NAMES[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument("unknown budget period", param="period") from None


def model_to_pb(entry: ModelEntry, price: PriceInfo | None) -> metering_pb2.CatalogModel:
    pb = metering_pb2.CatalogModel(id=entry.id, spec_json=json.dumps(entry.spec, sort_keys=True),
                                   versions=entry.versions, version=entry.version, source=entry.source,
                                   created_at=ts(entry.created_at), updated_at=ts(entry.updated_at))
    if price is not None:
        pb.price.CopyFrom(price_to_pb(price))
    return pb


def spec_from_json(text: str) -> dict[str, Any]:
    """A model's settings from the wire: a JSON object (empty text: none)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise InvalidArgument("spec_json is not JSON", param="spec") from None
    if not isinstance(value, dict):
        raise InvalidArgument("spec_json must be a JSON object", param="spec")
    return value


def optional_cached_input(pb: metering_pb2.PriceAmounts | metering_pb2.SetPriceRequest) -> int | None:
    """The cached-input price a message sets (None: not set, the input price applies)."""
    field = "cached_input_per_million_nanodollars"
    return pb.cached_input_per_million_nanodollars if pb.HasField(field) else None


def amounts_from_pb(pb: metering_pb2.PriceAmounts) -> PriceNanos:
    try:
        return PriceNanos(pb.input_per_million_nanodollars, pb.output_per_million_nanodollars,
                          pb.per_request_nanodollars, cached_input_per_million=optional_cached_input(pb))
    except MoneyError as exc:
        raise InvalidArgument(str(exc), param="price") from None
