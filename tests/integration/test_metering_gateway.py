"""The gateway's usage and admin routes against a real metering server; the cost and quota pieces of the edge."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest_asyncio
from fastapi import FastAPI

from inferplane.gateway.admin import admin_router
from inferplane.gateway.errors import from_status, install_handlers
from inferplane.gateway.protocol import models_body, usage_dict
from inferplane.v1 import common_pb2, router_pb2
from tests.integration.test_admission import Metering, database_url, metering, record  # noqa: F401  (fixtures)


@pytest_asyncio.fixture
async def http(metering: Metering) -> AsyncIterator[httpx.AsyncClient]:  # noqa: F811
    app = FastAPI()
    app.include_router(admin_router(f"127.0.0.1:{metering.server.port}"))
    install_handlers(app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        yield client


def auth(plain: str) -> dict[str, str]:
    return {"authorization": f"Bearer {plain}"}


async def test_admin_keys_prices_budgets_over_rest(metering: Metering, http: httpx.AsyncClient) -> None:  # noqa: F811
    _, admin = metering.store.create_key("ops", scopes=["admin"])
    _, user = metering.store.create_key("user")
    assert (await http.get("/admin/keys")).status_code == 401
    denied = await http.get("/admin/keys", headers=auth(user))
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_permissions"

    created = await http.post("/admin/keys", headers=auth(admin), json={
        "name": "svc", "tenant": "acme", "models": ["tiny-llama"], "requests_per_minute": 60,
        "budget": {"limit": "12.50", "period": "monthly"}})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["api_key"].startswith(f"sk-ip-{body['id']}-") and body["tenant"] == "acme"
    listed = (await http.get("/admin/keys", params={"tenant": "acme"}, headers=auth(admin))).json()["data"]
    assert [k["id"] for k in listed] == [body["id"]] and "api_key" not in listed[0]
    [b] = (await http.get("/admin/budgets", headers=auth(admin))).json()["data"]
    assert (b["scope"], b["subject"], b["limit"], b["spent"]) == ("key", body["id"], "12.5", "0")
    put = await http.put("/admin/budgets/tenant/acme", headers=auth(admin), json={"limit": "100", "period": "daily"})
    assert put.json()["period"] == "daily"

    price = await http.put("/admin/prices/tiny-llama", headers=auth(admin),
                           json={"input_per_million": "0.20", "output_per_million": "0.80", "per_request": "0.0001"})
    assert price.status_code == 200 and price.json()["per_request"] == "0.0001"
    assert price.json()["cached_input_per_million_tokens"] == "0.2"  # none set: the input price
    bad = await http.put("/admin/prices/tiny-llama", headers=auth(admin), json={"input_per_million": "0.0000000001"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input_per_million"
    too_dear = await http.put("/admin/prices/tiny-llama", headers=auth(admin),
                              json={"input_per_million": "0.20", "cached_input_per_million": "0.30"})
    assert too_dear.status_code == 400 and "cached_input_per_million" in too_dear.json()["error"]["message"]
    cheap = await http.put("/admin/prices/tiny-llama", headers=auth(admin),
                           json={"input_per_million": "0.20", "cached_input_per_million": "0.05",
                                 "output_per_million": "0.80"})
    assert cheap.status_code == 200 and cheap.json()["cached_input_per_million_tokens"] == "0.05"
    prices = (await http.get("/admin/prices", params={"history": "true"}, headers=auth(admin))).json()["data"]
    assert [p["input_per_million_tokens"] for p in prices] == ["0.15", "0.2", "0.2"]
    assert [p["cached_input_per_million_tokens"] for p in prices] == ["0.15", "0.2", "0.05"]
    assert (await http.get("/admin/prices", headers=auth(user))).status_code == 403

    revoked = await http.delete(f"/admin/keys/{body['id']}", headers=auth(admin))
    assert revoked.json()["revoked_at"] is not None
    missing = await http.delete("/admin/keys/nosuchkey000", headers=auth(admin))
    assert missing.status_code == 404 and missing.json()["error"]["code"] is None


async def test_usage_own_and_admin_with_csv(metering: Metering, http: httpx.AsyncClient) -> None:  # noqa: F811
    _, admin = metering.store.create_key("ops", scopes=["admin"])
    a_plain = metering.store.create_key("a", tenant_id="t1")[1]
    b_plain = metering.store.create_key("b", tenant_id="t2")[1]
    a = await metering.client.verify_key(a_plain, timeout=5)
    b = await metering.client.verify_key(b_plain, timeout=5)
    await metering.client.record_usage_batch([record("1", a, 1000, 1000), record("2", a, 1000, 0),
                                              record("3", b, 5, 5)])
    mine = (await http.get("/v1/usage", headers=auth(a_plain))).json()
    assert [(r["key_id"], r["requests"], r["cost"]) for r in mine["data"]] == [(a.key_id, 2, "0.0009")]
    assert mine["total_cost"] == "0.0009"
    snoop = (await http.get("/v1/usage", params={"key_id": b.key_id}, headers=auth(a_plain))).json()
    assert {r["key_id"] for r in snoop["data"]} == {a.key_id}  # never another key's, never another tenant's
    assert (await http.get("/admin/usage", headers=auth(a_plain))).status_code == 403
    everyone = await http.get("/admin/usage", params={"format": "csv"}, headers=auth(admin))
    assert everyone.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(everyone.text)))
    assert {r["key_id"] for r in rows} == {a.key_id, b.key_id} and rows[0]["date"]
    only_t2 = (await http.get("/admin/usage", params={"tenant": "t2"}, headers=auth(admin))).json()["data"]
    assert [r["key_id"] for r in only_t2] == [b.key_id]
    future = (await http.get("/v1/usage", params={"start": "2099-01-01", "end": "2099-02-01T00:00:00Z"},
                             headers=auth(a_plain))).json()
    assert future["data"] == [] and future["start"].startswith("2099-01-01")
    assert (await http.get("/v1/usage", params={"start": "2099-01-01"}, headers=auth(a_plain))).status_code == 400
    assert (await http.get("/v1/usage", params={"start": "soon"}, headers=auth(a_plain))).status_code == 400
    assert (await http.get("/v1/usage", params={"format": "xml"}, headers=auth(a_plain))).status_code == 400


async def test_usage_totals_cached_tokens_per_service_tier_in_json_and_csv(
        metering: Metering, http: httpx.AsyncClient) -> None:  # noqa: F811
    _, admin = metering.store.create_key("ops", scopes=["admin"])
    plain = metering.store.create_key("a", tenant_id="t1")[1]
    a = await metering.client.verify_key(plain, timeout=5)
    recs = [record("c1", a, 300, 10), record("c2", a, 40, 2), record("c3", a, 50, 5), record("c4", a, 9, 1)]
    recs[0].cached_tokens, recs[1].cached_tokens, recs[2].cached_tokens = 288, 32, 48
    recs[2].service_tier, recs[2].tier_multiplier = "flex", "0.5"
    recs[3].service_tier = "default"
    await metering.client.record_usage_batch(recs)

    mine = (await http.get("/v1/usage", headers=auth(plain))).json()["data"]
    got = {r["service_tier"]: (r["requests"], r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"])
           for r in mine}
    assert got == {"default": (3, 349, 320, 13), "flex": (1, 50, 48, 5)}
    everyone = await http.get("/admin/usage", params={"format": "csv"}, headers=auth(admin))
    rows = {r["service_tier"]: r for r in csv.DictReader(io.StringIO(everyone.text))}
    assert (rows["default"]["cached_tokens"], rows["flex"]["cached_tokens"]) == ("320", "48")
    assert (rows["default"]["prompt_tokens"], rows["flex"]["requests"]) == ("349", "1")
    listed = {u.request_id: u.service_tier for u in metering.store.list_usage(key_id=a.key_id)}
    assert listed == {"c1": "default", "c2": "default", "c3": "flex", "c4": "default"}


def test_exhausted_budget_is_insufficient_quota_and_a_rate_limit_is_not() -> None:
    quota = from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "You exceeded the budget of this API key.",
                        (("x-inferplane-error-code", "insufficient_quota"), ("x-ratelimit-limit-requests", "5")))
    assert (quota.status, quota.type, quota.code) == (429, "insufficient_quota", "insufficient_quota")
    assert quota.headers == {"x-ratelimit-limit-requests": "5"}
    limited = from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "Rate limit reached.",
                          (("retry-after", "3"), ("retry-after-ms", "2500")))
    assert (limited.status, limited.code) == (429, "rate_limit_exceeded")
    assert limited.headers == {"retry-after": "3", "retry-after-ms": "2500"}


# Usage's breakdowns, present and zero until prefix caching exists.
ZERO_DETAILS = {"prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def test_usage_carries_the_exact_cost_and_models_carry_pricing() -> None:
    msg = router_pb2.GenerateResponse(usage=common_pb2.Usage(prompt_tokens=7, completion_tokens=3, total_tokens=10,
                                                             cost_nanodollars=123_000))
    assert usage_dict(msg) == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "cost": "0.000123",
                               **ZERO_DETAILS}
    unpriced = router_pb2.GenerateResponse(usage=common_pb2.Usage(prompt_tokens=1, completion_tokens=1,
                                                                  total_tokens=2))
    assert "cost" not in (usage_dict(unpriced) or {})
    models = models_body(router_pb2.ListModelsResponse(models=[
        common_pb2.ModelInfo(id="tiny-llama", pricing=common_pb2.ModelPricing(
            input_per_million_nanodollars=150_000_000, output_per_million_nanodollars=600_000_000, version=3,
            cached_input_per_million_nanodollars=40_000_000)),
        common_pb2.ModelInfo(id="free")]))
    assert models["data"][0]["pricing"] == {"currency": "USD", "input_per_million_tokens": "0.15",
                                            "cached_input_per_million_tokens": "0.04",
                                            "output_per_million_tokens": "0.6", "per_request": "0", "version": 3}
    assert "pricing" not in models["data"][1]
