"""Fallback chains through the real services: metering (catalog, keys, ledger), a router polling it, an executor on
a real Triton serving tiny-llama, and the gateway app. The model asked for, ``nowhere-llama``, names a Triton model
no executor has (its executors are "down"); its catalog ``fallbacks`` and a request's own ``models`` send the
request to tiny-llama before any token, the response says so (streamed and not), and the usage record stamps
tiny-llama and is charged at tiny-llama's price, not the primary's. A key that may not use the fallback gets no
fallback; a request that falls back counts once against its key's rate limit; a caller's own error is never retried
elsewhere."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import pytest

from inferplane.router.main import Router
from tests.integration.test_admission import Metering, metering  # noqa: F401  (fixture)
from tests.integration.test_edge_modes import database_url  # noqa: F401  (fixture: SQLite)
from tests.integration.triton_stack import eventually, stack  # noqa: F401  (fixture)

pytestmark = pytest.mark.triton
PRIMARY = "nowhere-llama"


def chat(model: str | None = None, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, **extra}
    if model is not None:
        body["model"] = model
    return body


async def test_a_model_that_cannot_serve_falls_back_before_any_token_and_bills_the_fallback(
        stack: tuple[httpx.AsyncClient, Router], metering: Metering) -> None:  # noqa: F811
    gateway, router = stack
    _, admin_key = metering.store.create_key("ops", scopes=["admin"])
    _, user_key = metering.store.create_key("app")
    _, narrow_key = metering.store.create_key("narrow", models=[PRIMARY])
    admin, user = {"authorization": f"Bearer {admin_key}"}, {"authorization": f"Bearer {user_key}"}
    narrow = {"authorization": f"Bearer {narrow_key}"}

    # The primary: a Triton model no executor has, priced far above tiny-llama, falling back to tiny-llama.
    made = await gateway.post("/admin/models", headers=admin, json={
        "id": PRIMARY, "triton_model": PRIMARY, "price": {"input_per_million": "9", "output_per_million": "9"},
        "settings": {"tasks": ["chat", "completion"], "tokenizer": "models/tiny-llama", "context_length": 512,
                     "fallbacks": ["tiny-llama"]}})
    assert made.status_code == 201, made.text

    async def ready() -> bool:
        return (router.catalog_watch.version >= made.json()["catalog_version"]
                and all(r.reported for r in router.engine.executors.replicas.values())
                and router.engine.executors.serving_count("tiny-llama") > 0)

    await eventually(ready, 60, "the router polled the catalog and its executor reported")
    assert router.engine.executors.serving_count(PRIMARY) == 0  # nothing serves the primary

    # The catalog's fallback, not streamed: served by tiny-llama, and the response says so.
    r = await gateway.post("/v1/chat/completions", headers={**user, "x-request-id": "fb-catalog"}, json=chat(PRIMARY))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny-llama"
    usage = r.json()["usage"]

    # A request's own list (OpenRouter's ``models``, no ``model``), streamed: every chunk names tiny-llama.
    async with gateway.stream("POST", "/v1/chat/completions", headers={**user, "x-request-id": "fb-request"},
                              json=chat(models=[PRIMARY, "tiny-llama"], stream=True,
                                        stream_options={"include_usage": True})) as s:
        assert s.status_code == 200, await s.aread()
        chunks = [json.loads(line[6:]) async for line in s.aiter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks and {c["model"] for c in chunks} == {"tiny-llama"}

    # One record each, stamped with the model that served, charged at its price (not the primary's 9 USD).
    async def recorded() -> bool:
        return {"fb-catalog", "fb-request"} <= {u.request_id for u in metering.store.list_usage(limit=100)}

    await eventually(recorded, 30, "usage records")
    rows = {u.request_id: u for u in metering.store.list_usage(limit=100)}
    price = metering.store.current_price("tiny-llama")
    assert price is not None
    for rid in ("fb-catalog", "fb-request"):
        row = rows[rid]
        assert row.model == "tiny-llama", row
        assert row.cost_nanos == price.price.cost(row.prompt_tokens, row.completion_tokens, row.cached_tokens)
    assert (rows["fb-catalog"].prompt_tokens, rows["fb-catalog"].completion_tokens) == (
        usage["prompt_tokens"], usage["completion_tokens"])
    assert usage["cost"] is not None
    assert not any(u.model == PRIMARY for u in metering.store.list_usage(limit=100))  # the primary left nothing

    # A key that may not use the fallback: the catalog's fallback is skipped (the primary's own 503), and naming it
    # in ``models`` is the 403 a direct request would get.
    r = await gateway.post("/v1/chat/completions", headers=narrow, json=chat(PRIMARY))
    assert r.status_code == 503, r.text
    r = await gateway.post("/v1/chat/completions", headers=narrow, json=chat(models=[PRIMARY, "tiny-llama"]))
    assert r.status_code == 403 and r.json()["error"]["param"] == "models", r.text
    r = await gateway.post("/v1/chat/completions", headers=user, json=chat(models=[PRIMARY, "no-such-model"]))
    assert r.status_code == 404 and r.json()["error"]["param"] == "models", r.text

    # A fallback counts once against the key's rate limits: a key allowed one request per minute is served by the
    # fallback (its primary's admission and the fallback's are one request), and only its next request is refused.
    _, one_rpm_key = metering.store.create_key("one-rpm", requests_per_minute=1)
    one_rpm = {"authorization": f"Bearer {one_rpm_key}"}
    r = await gateway.post("/v1/chat/completions", headers=one_rpm, json=chat(PRIMARY))
    assert r.status_code == 200 and r.json()["model"] == "tiny-llama", r.text
    r = await gateway.post("/v1/chat/completions", headers=one_rpm, json=chat("tiny-llama"))
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text

    # The caller's own error is not retried on the fallback: a completion longer than the context is a 400.
    r = await gateway.post("/v1/chat/completions", headers=user, json=chat(PRIMARY, max_tokens=100_000))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    # The other shape of a fallback list is refused by name.
    r = await gateway.post("/v1/chat/completions", headers=user, json=chat(PRIMARY, fallbacks=["tiny-llama"]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "fallbacks", r.text


async def test_tiers_are_echoed_billed_at_their_multiplier_and_listed(
        stack: tuple[httpx.AsyncClient, Router], metering: Metering) -> None:  # noqa: F811
    """A copy of tiny-llama with flex at half price and priority at double: each tier's request is echoed, its usage
    record is charged the price times the multiplier (one rounding) and keeps the tier, ``/v1/usage`` sums each tier
on a row of its own, and ``/v1/models`` lists the tiers' prices."""
    gateway, router = stack
    _, admin_key = metering.store.create_key("ops", scopes=["admin"])
    app, user_key = metering.store.create_key("app")
    admin, user = {"authorization": f"Bearer {admin_key}"}, {"authorization": f"Bearer {user_key}"}
    made = await gateway.post("/admin/models", headers=admin, json={
        "id": "tiered-llama", "triton_model": "tiny-llama",
        "price": {"input_per_million": "0.15", "output_per_million": "0.6"},
        "settings": {"tier_multipliers": {"flex": "0.5", "priority": "2"}}})
    assert made.status_code == 201, made.text

    async def ready() -> bool:
        return (router.catalog_watch.version >= made.json()["catalog_version"]
                and router.engine.executors.serving_count("tiny-llama") > 0)

    await eventually(ready, 60, "the router polled the catalog and sees tiny-llama served")
    multipliers = {"auto": 1, "default": 1, "flex": Decimal("0.5"), "priority": Decimal(2)}
    for tier in multipliers:
        r = await gateway.post("/v1/chat/completions", headers={**user, "x-request-id": f"tier-{tier}"},
                               json=chat("tiered-llama", service_tier=tier))
        assert r.status_code == 200, r.text
        assert r.json()["service_tier"] == ("default" if tier == "auto" else tier)
    async with gateway.stream("POST", "/v1/chat/completions", headers=user,
                              json=chat("tiered-llama", service_tier="flex", stream=True)) as s:
        chunks = [json.loads(line[6:]) async for line in s.aiter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks and {c["service_tier"] for c in chunks} == {"flex"}

    async def recorded() -> bool:
        return len([u for u in metering.store.list_usage(limit=100) if u.request_id.startswith("tier-")]) == 4

    await eventually(recorded, 30, "usage records")
    price = metering.store.current_price("tiered-llama")
    assert price is not None
    for row in metering.store.list_usage(limit=100):
        if row.request_id.startswith("tier-"):
            m = multipliers[row.request_id[len("tier-"):]]
            assert row.cost_nanos == price.price.cost(row.prompt_tokens, row.completion_tokens, row.cached_tokens,
                    multiplier=Decimal(m)), row
            assert row.service_tier == ("default" if row.request_id == "tier-auto" else row.request_id[5:]), row

    # The ledger keeps the tier that served: /v1/usage has a row per tier, its sums the records' (exact).
    async def all_recorded() -> bool:
        return len(metering.store.list_usage(limit=100, key_id=app.key_id)) == 5  # and the streamed flex one

    await eventually(all_recorded, 30, "the streamed request's usage record")
    records = metering.store.list_usage(limit=100, key_id=app.key_id)
    summary = (await gateway.get("/v1/usage", headers=user)).json()["data"]
    assert sorted((r["service_tier"], r["requests"]) for r in summary) == [("default", 2), ("flex", 2), ("priority", 1)]
    for r in summary:
        mine = [u for u in records if u.service_tier == r["service_tier"]]
        assert (r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"]) == (
            sum(u.prompt_tokens for u in mine), sum(u.cached_tokens for u in mine),
            sum(u.completion_tokens for u in mine))
        assert Decimal(r["cost"]) * 10**9 == sum(u.cost_nanos or 0 for u in mine)

    listed = {m["id"]: m for m in (await gateway.get("/v1/models", headers=user)).json()["data"]}
    tiers = listed["tiered-llama"]["pricing"]["tiers"]
    assert (tiers["flex"]["multiplier"], tiers["flex"]["input_per_million_tokens"]) == ("0.5", "0.075")
    assert (tiers["priority"]["multiplier"], tiers["priority"]["output_per_million_tokens"]) == ("2", "1.2")
