"""Usage and admin REST routes: ``GET /v1/usage`` for the caller's own key, ``/admin/*`` for admin keys (the model
catalog's, ``/admin/models``, are in ``admin_models.py``).

Thin: each route converts the query or body, calls metering's gRPC API with the caller's key as
``authorization`` metadata, and converts back. Metering decides who may see what (an admin key sees every
tenant; any other key sees its own usage only, whatever it asks for), so the gateway holds no secret.
Money goes out as exact USD strings ("0.000123") and comes in the same way.

    app.include_router(admin_router(settings.metering_addr))
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from inferplane.common.money import MoneyError, format_usd, usd_to_nanos
from inferplane.common.server import client_channel
from inferplane.common.wire import (
    BUDGET_PERIOD_NAMES,
    BUDGET_PERIODS,
    BUDGET_SCOPE_NAMES,
    BUDGET_SCOPES,
    DEFAULT_BUDGET_PERIOD,
)
from inferplane.gateway.admin_models import add_model_routes
from inferplane.gateway.admin_upload import add_upload_route
from inferplane.gateway.auth import key_metadata
from inferplane.gateway.dashboard import add_dashboard_routes
from inferplane.gateway.errors import GatewayError, from_rpc_error, from_validation_error
from inferplane.v1 import metering_pb2, metering_pb2_grpc

USAGE_COLUMNS = ["date", "key_id", "tenant_id", "model", "service_tier", "requests", "prompt_tokens",
                 "cached_tokens", "completion_tokens", "cancelled_requests", "cost"]


# --- bodies ------------------------------------------------------------------------------------------

class BudgetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: str = Field(description="USD per period, e.g. \"10.00\"")
    period: str = DEFAULT_BUDGET_PERIOD

    @field_validator("period")
    @classmethod
    def _known_period(cls, value: str) -> str:
        if value not in BUDGET_PERIODS:
            raise ValueError(f"expected one of {', '.join(repr(p) for p in BUDGET_PERIODS)}")
        return value

    def to_pb(self) -> metering_pb2.Budget:
        return metering_pb2.Budget(limit_nanodollars=_nanos(self.limit, "limit"), period=BUDGET_PERIODS[self.period])


class CreateKeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    tenant: str = "default"
    models: list[str] = Field(default_factory=list)
    admin: bool = False
    expires_at: datetime | None = None
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    budget: BudgetBody | None = None

    def to_pb(self) -> metering_pb2.CreateKeyRequest:
        req = metering_pb2.CreateKeyRequest(name=self.name, tenant_id=self.tenant, models=self.models,
                                            scopes=["admin"] if self.admin else ["inference"],
                                            requests_per_minute=self.requests_per_minute,
                                            tokens_per_minute=self.tokens_per_minute)
        if self.expires_at is not None:
            req.expires_at.CopyFrom(_ts(self.expires_at))
        if self.budget is not None:
            req.budget.CopyFrom(self.budget.to_pb())
        return req


class PriceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_per_million: str = "0"
    output_per_million: str = "0"
    per_request: str = "0"
    # Per million prompt tokens reused from the prefix cache; absent: the input price.
    cached_input_per_million: str | None = None


# --- conversions -------------------------------------------------------------------------------------

def _nanos(value: str, param: str) -> int:
    try:
        return usd_to_nanos(value, field=param)
    except MoneyError as exc:
        raise GatewayError(400, str(exc), param=param) from None


def _ts(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value if value.tzinfo is not None else value.replace(tzinfo=UTC))
    return out


def _iso(value: Timestamp, present: bool = True) -> str | None:
    return value.ToDatetime(tzinfo=UTC).isoformat() if present else None


def parse_time(value: str | None, param: str) -> Timestamp | None:
    """An ISO 8601 date or date-time (UTC when it names no zone), or Unix seconds."""
    if value is None or value == "":
        return None
    try:
        when = datetime.fromtimestamp(float(value), UTC) if value.replace(".", "", 1).isdigit() \
            else datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise GatewayError(400, f"Invalid '{param}': expected an ISO 8601 date/time or Unix seconds.",
                           param=param) from None
    return _ts(when)


def key_dict(k: metering_pb2.ApiKeyInfo) -> dict[str, Any]:
    return {"id": k.key_id, "object": "api_key", "name": k.name, "tenant": k.tenant_id, "models": list(k.models),
            "scopes": list(k.scopes),
            "requests_per_minute": k.requests_per_minute if k.HasField("requests_per_minute") else None,
            "tokens_per_minute": k.tokens_per_minute if k.HasField("tokens_per_minute") else None,
            "created_at": _iso(k.created_at), "expires_at": _iso(k.expires_at, k.HasField("expires_at")),
            "revoked_at": _iso(k.revoked_at, k.HasField("revoked_at"))}


def price_dict(p: metering_pb2.Price) -> dict[str, Any]:
    return {"model": p.model, "currency": "USD",
            "input_per_million_tokens": format_usd(p.input_per_million_nanodollars),
            "cached_input_per_million_tokens": format_usd(
                p.cached_input_per_million_nanodollars if p.HasField("cached_input_per_million_nanodollars")
                else p.input_per_million_nanodollars),
            "output_per_million_tokens": format_usd(p.output_per_million_nanodollars),
            "per_request": format_usd(p.per_request_nanodollars), "version": p.version, "source": p.source,
            "effective_at": _iso(p.effective_at)}


def budget_dict(b: metering_pb2.Budget) -> dict[str, Any]:
    return {"scope": BUDGET_SCOPE_NAMES.get(b.scope), "subject": b.subject_id, "currency": "USD",
            "limit": format_usd(b.limit_nanodollars), "period": BUDGET_PERIOD_NAMES.get(b.period),
            "period_start": _iso(b.period_start), "spent": format_usd(b.spent_nanodollars),
            "reserved": format_usd(b.reserved_nanodollars)}


def usage_row(r: metering_pb2.UsageSummaryRow) -> dict[str, Any]:
    """One summary row; ``service_tier`` is None (JSON null, CSV empty) for records from before the ledger kept
    tiers; ``cached_tokens`` are part of ``prompt_tokens`` (OpenAI's ``prompt_tokens_details.cached_tokens``)."""
    return {"date": r.day, "key_id": r.key_id, "tenant_id": r.tenant_id, "model": r.model,
            "service_tier": r.service_tier or None, "requests": r.requests, "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens, "completion_tokens": r.completion_tokens,
            "cancelled_requests": r.cancelled_requests, "cost": format_usd(r.cost_nanodollars)}


def usage_response(resp: metering_pb2.GetUsageSummaryResponse, fmt: str) -> Response:
    rows = [usage_row(r) for r in resp.rows]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=USAGE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": 'attachment; filename="usage.csv"'})
    total = sum(r.cost_nanodollars for r in resp.rows)
    return JSONResponse({"object": "list", "start": _iso(resp.start), "end": _iso(resp.end), "data": rows,
                         "total_cost": format_usd(total), "currency": "USD"})


# --- routes ------------------------------------------------------------------------------------------

async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _format(value: str) -> str:
    if value not in ("json", "csv"):
        raise GatewayError(400, "Invalid 'format': expected 'json' or 'csv'.", param="format")
    return value


def admin_router(metering_addr: str, *, timeout_s: float = 10.0, uploads_dir: Path | None = None,
                 max_upload_bytes: int = 0, dashboard_credentials_file: str = "",
                 router_metrics_url: str = "") -> APIRouter:
    """The routes, with their own channel to metering (opened and closed with the app); ``uploads_dir``: where
    ``POST /admin/models/upload`` unpacks checkpoints (None: no upload route); the usage dashboard's settings
    (``inferplane.gateway.dashboard``)."""
    state: dict[str, metering_pb2_grpc.MeteringServiceStub] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        channel = client_channel(metering_addr)
        state["stub"] = metering_pb2_grpc.MeteringServiceStub(channel)
        try:
            yield
        finally:
            await channel.close(grace=None)

    router = APIRouter(lifespan=lifespan)

    async def call(request: Request, method: str, message: Any) -> Any:
        metadata = key_metadata(request.headers)
        try:
            return await getattr(state["stub"], method)(message, metadata=metadata, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def require_admin(request: Request) -> None:
        me = await call(request, "WhoAmI", metering_pb2.WhoAmIRequest())
        if "admin" not in me.scopes:
            raise GatewayError(403, "This API key lacks the 'admin' scope.", code="insufficient_permissions")

    @router.get("/v1/usage")
    async def own_usage(request: Request, start: str | None = None, end: str | None = None,
                        format: str = "json") -> Response:
        """The caller's own usage by day and model (an admin key's own too: everyone's is /admin/usage)."""
        req = metering_pb2.GetUsageSummaryRequest(start=parse_time(start, "start"), end=parse_time(end, "end"))
        fmt = _format(format)
        me = await call(request, "WhoAmI", metering_pb2.WhoAmIRequest())
        if "admin" in me.scopes:  # metering reads an admin's empty filter as "every key"
            req.key_id = me.key_id
        return usage_response(await call(request, "GetUsageSummary", req), fmt)

    @router.get("/admin/usage")
    async def all_usage(request: Request, start: str | None = None, end: str | None = None,
                        key_id: str | None = None, tenant: str | None = None, format: str = "json") -> Response:
        """Usage across keys (admin): by day, key and model; filter by key or tenant."""
        req = metering_pb2.GetUsageSummaryRequest(start=parse_time(start, "start"), end=parse_time(end, "end"),
                                                  key_id=key_id, tenant_id=tenant)
        await require_admin(request)  # a plain key would get its own usage only: refuse rather than mislead
        return usage_response(await call(request, "GetUsageSummary", req), _format(format))

    @router.post("/admin/keys")
    async def create_key(request: Request) -> Response:
        body: CreateKeyBody = await _parse(request, CreateKeyBody)
        resp = await call(request, "CreateKey", body.to_pb())
        return JSONResponse({**key_dict(resp.key), "api_key": resp.api_key}, status_code=201)

    @router.get("/admin/keys")
    async def list_keys(request: Request, tenant: str | None = None) -> Response:
        resp = await call(request, "ListKeys", metering_pb2.ListKeysRequest(tenant_id=tenant))
        return JSONResponse({"object": "list", "data": [key_dict(k) for k in resp.keys]})

    @router.delete("/admin/keys/{key_id}")
    async def revoke_key(request: Request, key_id: str) -> Response:
        return JSONResponse(key_dict(await call(request, "RevokeKey", metering_pb2.RevokeKeyRequest(key_id=key_id))))

    @router.get("/admin/prices")
    async def list_prices(request: Request, history: bool = False) -> Response:
        await require_admin(request)
        resp = await call(request, "ListPrices", metering_pb2.ListPricesRequest(include_history=history))
        return JSONResponse({"object": "list", "data": [price_dict(p) for p in resp.prices]})

    @router.put("/admin/prices/{model:path}")
    async def set_price(request: Request, model: str) -> Response:
        body: PriceBody = await _parse(request, PriceBody)
        req = metering_pb2.SetPriceRequest(
            model=model, input_per_million_nanodollars=_nanos(body.input_per_million, "input_per_million"),
            output_per_million_nanodollars=_nanos(body.output_per_million, "output_per_million"),
            per_request_nanodollars=_nanos(body.per_request, "per_request"))
        if body.cached_input_per_million is not None:
            req.cached_input_per_million_nanodollars = _nanos(body.cached_input_per_million, "cached_input_per_million")
        return JSONResponse(price_dict(await call(request, "SetPrice", req)))

    @router.get("/admin/budgets")
    async def list_budgets(request: Request) -> Response:
        resp = await call(request, "ListBudgets", metering_pb2.ListBudgetsRequest())
        return JSONResponse({"object": "list", "data": [budget_dict(b) for b in resp.budgets]})

    @router.put("/admin/budgets/{scope}/{subject}")
    async def set_budget(request: Request, scope: str, subject: str) -> Response:
        if scope not in BUDGET_SCOPES:
            raise GatewayError(404, f"Invalid URL ({request.method} {request.url.path})")
        body: BudgetBody = await _parse(request, BudgetBody)
        req = metering_pb2.SetBudgetRequest(scope=BUDGET_SCOPES[scope], subject_id=subject,
                                            limit_nanodollars=_nanos(body.limit, "limit"),
                                            period=BUDGET_PERIODS[body.period])
        return JSONResponse(budget_dict(await call(request, "SetBudget", req)))

    add_model_routes(router, call, parse=_parse, require_admin=require_admin, nanos=_nanos, price_dict=price_dict,
                     iso=_iso)
    add_dashboard_routes(router, lambda: state["stub"], credentials_file=dashboard_credentials_file,
                         router_metrics_url=router_metrics_url, timeout_s=timeout_s)
    if uploads_dir is not None:
        add_upload_route(router, call, require_admin=require_admin, nanos=_nanos, price_dict=price_dict, iso=_iso,
                         uploads_dir=uploads_dir, max_upload_bytes=max_upload_bytes)
    return router
