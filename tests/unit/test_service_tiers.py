"""Service tiers in the router's queue, the money rule and the ledger: priority goes before default before flex,
flex is shed first (429 with retry-after) while default and priority still queue, and a tier's multiplier prices
the request exactly (one rounding), in the router's settle and in metering's ledger alike."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import grpc
import pytest

from inferplane.common import wire
from inferplane.common.catalog import CatalogModel, parse_multiplier
from inferplane.common.money import PriceNanos
from inferplane.common.server import failure_of
from inferplane.gateway.errors import from_status
from inferplane.gateway.protocol import ChatCompletionEncoder, ChatCompletionRequest, pricing_dict
from inferplane.metering.store import MeteringStore, UsageRow
from inferplane.router.capacity import FlexShed, ModelGate, Overloaded
from inferplane.v1 import common_pb2, router_pb2
from tests.unit.test_metering_ledger import PRICE, SECRET

FLEX, DEFAULT, PRIORITY = wire.FLEX_TIER, wire.DEFAULT_TIER, wire.PRIORITY_TIER
BASE = {"id": "m", "triton_model": "m", "tokenizer": "."}


async def steps(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_waiters_go_in_by_tier_then_by_arrival() -> None:
    g = ModelGate("m", lambda: 1, max_queue=10, queue_timeout_s=5)
    await g.acquire(1.0)
    order: list[str] = []

    async def wait(name: str, tier: str) -> None:
        await g.acquire(5.0, tier=tier)
        order.append(name)

    arrivals = [("f1", FLEX), ("d1", DEFAULT), ("f2", FLEX), ("p1", PRIORITY), ("d2", DEFAULT), ("p2", PRIORITY)]
    tasks = []
    for name, tier in arrivals:
        tasks.append(asyncio.ensure_future(wait(name, tier)))
        await steps(1)
    await steps()
    assert g.queued == 6
    for _ in arrivals:
        g.release()
        await steps()
    await asyncio.gather(*tasks)
    assert order == ["p1", "p2", "d1", "d2", "f1", "f2"]
    assert (g.running, g.queued) == (1, 0)


async def test_a_full_queue_sheds_flex_first_and_still_queues_default_and_priority() -> None:
    g = ModelGate("m", lambda: 1, max_queue=2, queue_timeout_s=5)
    await g.acquire(1.0)
    flex = [asyncio.ensure_future(g.acquire(5.0, tier=FLEX)) for _ in range(2)]
    await steps()
    assert g.queued == 2
    # a flex request finding the queue full: refused at once, 429 with retry-after
    refused = asyncio.ensure_future(g.acquire(5.0, tier=FLEX))
    await steps(1)
    assert refused.done()
    with pytest.raises(FlexShed) as info:
        await refused
    assert info.value.reason == wire.REASON_RESOURCE_UNAVAILABLE
    trailers = failure_of(info.value).trailers()
    assert dict(trailers)["retry-after"] == "1"
    err = from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(info.value), trailers)
    assert (err.status, err.code, err.headers.get("retry-after")) == (429, "resource_unavailable", "1")
    assert "flex" in err.message
    # a default and a priority request take the newest flex waiters' places; those are shed (429)
    default = asyncio.ensure_future(g.acquire(5.0, tier=DEFAULT))
    await steps()
    assert flex[1].done() and not flex[0].done()
    priority = asyncio.ensure_future(g.acquire(5.0, tier=PRIORITY))
    await steps()
    assert flex[0].done() and g.queued == 2
    for f in flex:
        with pytest.raises(FlexShed):
            await f
    # no flex left to shed: a default request finds the queue full, 503 overloaded as before
    with pytest.raises(Overloaded) as full:
        await g.acquire(5.0, tier=DEFAULT)
    assert type(full.value) is Overloaded and full.value.reason == wire.REASON_OVERLOADED
    g.release()
    await steps()
    assert priority.done() and not default.done()  # priority first
    g.release()
    await steps()
    assert default.done()
    await asyncio.gather(priority, default)
    assert (g.running, g.queued) == (1, 0)


async def test_a_flex_request_that_waits_too_long_is_a_429() -> None:
    g = ModelGate("m", lambda: 1, max_queue=4, queue_timeout_s=0.05)
    await g.acquire(1.0)
    with pytest.raises(FlexShed):
        await g.acquire(5.0, tier=FLEX)
    with pytest.raises(Overloaded) as info:
        await g.acquire(5.0, tier=DEFAULT)
    assert type(info.value) is Overloaded
    assert (g.running, g.queued) == (1, 0)


def test_a_multiplier_prices_the_exact_cost_rounded_once() -> None:
    price = PriceNanos(input_per_million=150_000_000, output_per_million=600_000_000, per_request=1_000)
    assert price.cost(1000, 500, multiplier=Decimal(1)) == price.cost(1000, 500) == 451_000
    assert price.cost(1000, 500, multiplier=Decimal("0.5")) == 225_500
    assert price.cost(1000, 500, multiplier=Decimal(2)) == 902_000
    # 1 prompt token at $0.15/M is 150 nano-dollars; x 0.333333 = 49.99995: rounded once, to 50
    assert PriceNanos(input_per_million=150_000_000).cost(1, 0, multiplier=Decimal("0.333333")) == 50
    # half to even: 3 nano-dollars x 0.5 = 1.5 -> 2; 5 x 0.5 = 2.5 -> 2
    assert PriceNanos(per_request=0, input_per_million=3_000_000).cost(1, 0, multiplier=Decimal("0.5")) == 2
    assert PriceNanos(per_request=0, input_per_million=5_000_000).cost(1, 0, multiplier=Decimal("0.5")) == 2


@pytest.mark.parametrize("bad", ["0", "-1", "101", "0.0000001", "abc", True, None])
def test_bad_multipliers_are_refused_by_the_catalog(bad: object) -> None:
    with pytest.raises(ValueError, match="tier_multipliers"):
        CatalogModel.model_validate({**BASE, "tier_multipliers": {"flex": bad}})


def test_catalog_multipliers() -> None:
    m = CatalogModel.model_validate({"id": "m", "triton_model": "m", "tokenizer": ".",
                                     "tier_multipliers": {"flex": 0.5, "priority": "2.0"}})
    assert m.tier_multipliers == {"flex": "0.5", "priority": "2"}
    assert (m.multiplier(FLEX), m.multiplier(PRIORITY), m.multiplier(DEFAULT)) == (
        Decimal("0.5"), Decimal(2), Decimal(1))
    assert parse_multiplier("1.25") == Decimal("1.25")
    with pytest.raises(ValueError):
        CatalogModel.model_validate({**BASE, "tier_multipliers": {"gold": "2"}})


def test_the_ledger_charges_the_tier_s_multiplier_and_reserves_at_it(tmp_path: Path) -> None:
    store = MeteringStore(f"sqlite:///{tmp_path / 'metering.db'}", SECRET)
    store.migrate()
    try:
        key, _ = store.create_key("k")
        v = store.set_price("tiny-llama", PRICE)
        for rid, tier, multiplier in (("d", "default", None), ("f", "flex", Decimal("0.5")),
                                      ("p", "priority", Decimal(2))):
            store.record_usage(UsageRow(request_id=rid, key_id=key.key_id, model="tiny-llama", prompt_tokens=1000,
                                        completion_tokens=500, finish_reason="stop", latency_ms=1,
                                        created_at=datetime.now(UTC), price_version=v.price.version,
                                        service_tier=tier, tier_multiplier=multiplier))
        rows = {r.request_id: r.cost_nanos for r in store.list_usage()}
        assert rows == {"d": 450_000, "f": 225_000, "p": 900_000}
        store.set_budget("key", key.key_id, 10**9)
        assert store.reserve("r1", key.key_id, "tiny-llama", 1000, 500, Decimal(2)).reserved_nanos == 900_000
        assert store.reserve("r2", key.key_id, "tiny-llama", 1000, 500).reserved_nanos == 450_000
    finally:
        store.close()


def test_the_rest_field_and_the_echo() -> None:
    def body(tier: object) -> dict[str, object]:
        return {"model": "m", "messages": [{"role": "user", "content": "x"}], "service_tier": tier}

    tiers = {t: ChatCompletionRequest.model_validate(body(t)).to_generate_request().service_tier
             for t in ("auto", "default", "flex", "priority")}
    assert tiers == {"auto": common_pb2.SERVICE_TIER_DEFAULT, "default": common_pb2.SERVICE_TIER_DEFAULT,
                     "flex": common_pb2.SERVICE_TIER_FLEX, "priority": common_pb2.SERVICE_TIER_PRIORITY}
    assert ChatCompletionRequest.model_validate(body(None)).to_generate_request().service_tier == 0
    with pytest.raises(ValueError, match="service_tier"):
        ChatCompletionRequest.model_validate(body("scale"))
    first = router_pb2.GenerateResponse(request_id="r", model="m", service_tier=common_pb2.SERVICE_TIER_FLEX)
    enc = ChatCompletionEncoder(first)
    assert enc.body(None)["service_tier"] == "flex"
    assert enc.text_chunk("hi")["service_tier"] == "flex"
    assert "service_tier" not in ChatCompletionEncoder(router_pb2.GenerateResponse(request_id="r")).body(None)


def test_models_list_prices_per_tier() -> None:
    info = common_pb2.ModelInfo(id="m", pricing=common_pb2.ModelPricing(
        input_per_million_nanodollars=150_000_000, output_per_million_nanodollars=600_000_000, version=3,
        cached_input_per_million_nanodollars=50_000_000, tier_multipliers={"flex": "0.5", "priority": "2"}))
    tiers = pricing_dict(info)["tiers"]  # type: ignore[index]
    assert tiers["default"] == {"multiplier": "1", "input_per_million_tokens": "0.15",
                                "cached_input_per_million_tokens": "0.05", "output_per_million_tokens": "0.6",
                                "per_request": "0"}
    assert tiers["flex"] == {"multiplier": "0.5", "input_per_million_tokens": "0.075",
                             "cached_input_per_million_tokens": "0.025", "output_per_million_tokens": "0.3",
                             "per_request": "0"}
    assert tiers["priority"]["input_per_million_tokens"] == "0.3"
    info.pricing.tier_multipliers.clear()  # every tier at the default price: no "tiers"
    assert "tiers" not in (pricing_dict(info) or {})
