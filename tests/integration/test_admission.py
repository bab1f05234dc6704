"""Admission against a real metering server (gRPC on loopback) on SQLite and on PostgreSQL.

The headline: 64 concurrent requests against a small budget never overspend it, whatever they generate.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf.timestamp_pb2 import Timestamp

from inferplane.common.catalog import Catalog, CatalogModel, ModelPrices
from inferplane.common.errors import PermissionDenied, Unavailable
from inferplane.common.server import GrpcServer, channel_options
from inferplane.common.settings import ServerSettings
from inferplane.common.wire import ERROR_CODE, REASON_INSUFFICIENT_QUOTA, REASON_RATE_LIMITED
from inferplane.metering.main import MeteringSettings, build_server
from inferplane.metering.store import MeteringStore
from inferplane.router.admission import Admission, AdmissionRefused, PriceBook, stamp
from inferplane.router.capacity import ModelGate
from inferplane.router.clients import KeyInfo, MeteringClient
from inferplane.router.lease import Clock, Lease
from inferplane.router.outbox import UsageOutbox, batch_sender
from inferplane.router.ratelimit import LocalRateLimiter
from inferplane.router.usage import UsageRecorder
from inferplane.v1 import metering_pb2
from tests.integration.test_postgres_store import fresh_postgres_database

SECRET = b"admission-test-secret-0123456789"
MODEL = CatalogModel(id="tiny-llama", triton_model="tiny-llama", tokenizer=Path("."), context_length=512,
                     prices=ModelPrices(input_per_million="0.15", output_per_million="0.60"))
CATALOG = Catalog(models=[MODEL])
# Fast reconnects: the tests stop and restart metering and should not wait out gRPC's default backoff.
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
             ("grpc.max_reconnect_backoff_ms", 500)]


@dataclass
class Metering:
    store: MeteringStore
    server: GrpcServer
    channel: grpc.aio.Channel
    client: MeteringClient
    settings: MeteringSettings

    async def key(self, *, budget_nanos: int | None = None, tenant: str = "default", **kw: object) -> KeyInfo:
        info, plain = self.store.create_key("test", tenant_id=tenant, **kw)  # type: ignore[arg-type]
        if budget_nanos is not None:
            self.store.set_budget("key", info.key_id, budget_nanos)
        return await self.client.verify_key(plain, timeout=5)

    async def restart(self) -> None:
        self.server = build_server(self.settings, store=self.store)
        await self.server.start()


def metering_settings(database_url: str, tmp_path: Path, port: int = 0) -> MeteringSettings:
    return MeteringSettings(server=ServerSettings(port=port, grace_seconds=0), database_url=database_url,
                            secret_file=tmp_path / "secret", catalog=None)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'metering.db'}"
    else:
        yield from fresh_postgres_database()


@pytest_asyncio.fixture
async def metering(database_url: str, tmp_path: Path) -> AsyncIterator[Metering]:
    settings = metering_settings(database_url, tmp_path)
    store = MeteringStore(database_url, SECRET)
    store.migrate()
    store.set_price(MODEL.id, MODEL.prices.nanos())  # type: ignore[union-attr]
    server = build_server(settings, store=store)
    await server.start()
    settings.server = settings.server.model_copy(update={"port": server.port})  # a restart reuses the port
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=channel_options() + RECONNECT)
    m = Metering(store, server, channel, MeteringClient(channel), settings)
    try:
        yield m
    finally:
        await channel.close(None)
        await m.server.stop(0)  # the one running now (a test may have restarted it)
        store.close()


def admission(m: Metering) -> Admission:
    return Admission(m.client, LocalRateLimiter(), PriceBook(m.client, CATALOG))


def lease(adm: Admission, recorder: UsageRecorder, key: KeyInfo, request_id: str, prompt: int, max_tokens: int
          ) -> Lease:
    """A request's lease as the engine makes it (a queue with room for all: these tests are about budgets)."""
    gate = ModelGate(MODEL.id, lambda: 1_000, max_queue=0, queue_timeout_s=1.0)
    return Lease(adm, gate, recorder, key=key, model=MODEL, request_id=request_id, operation="chat",
                 clock=Clock.start(None, 60.0), prompt_tokens=prompt, max_tokens=max_tokens)


def record(request_id: str, key: KeyInfo, prompt: int, completion: int, finish: str = "stop"
           ) -> metering_pb2.UsageRecord:
    created = Timestamp()
    created.GetCurrentTime()
    return metering_pb2.UsageRecord(request_id=request_id, key_id=key.key_id, model=MODEL.id, prompt_tokens=prompt,
                                    completion_tokens=completion, finish_reason=finish, latency_ms=5,
                                    created_at=created)


async def test_64_concurrent_requests_against_a_small_budget_never_overspend(metering: Metering,
                                                                             tmp_path: Path) -> None:
    # Worst case of one request (100 prompt + 200 max tokens at $0.15/$0.60 per M) is 135,000 nano-dollars;
    # the budget holds seven of them and a bit. Each admitted request then generates a random number of tokens.
    limit = 7 * 135_000 + 50_000
    key = await metering.key(budget_nanos=limit)
    assert key.has_budget
    adm = admission(metering)
    outbox = UsageOutbox(tmp_path / "outbox.db", batch_sender(metering.client), batch_size=16)
    outbox.start()
    rng = random.Random(7)
    admitted: list[int] = []
    refused: list[AdmissionRefused] = []

    recorder = UsageRecorder(metering.client, outbox)

    async def one_request(i: int) -> None:
        for attempt in range(3):  # a refused caller tries again a little later (settled budget may be freed)
            it = lease(adm, recorder, key, f"req-{i}-{attempt}", 100, 200)
            try:
                async with it:  # admitted (the worst case reserved); on leaving, settled through its usage record
                    completion = rng.randint(0, 200)
                    it.began()
                    await asyncio.sleep(rng.random() * 0.02)  # "generating"
                    it.finished("stop", prompt_tokens=100, completion_tokens=completion)
            except AdmissionRefused as exc:
                refused.append(exc)
                await asyncio.sleep(0.01)
                continue
            assert it.ticket is not None and it.cost is not None
            assert it.cost <= it.ticket.reserved_nanos
            admitted.append(it.cost)
            return

    await asyncio.gather(*(one_request(i) for i in range(64)))
    assert await outbox.flushed(30)
    await outbox.stop()

    [b] = metering.store.list_budgets()
    ledger = sum(r.cost_nanos or 0 for r in metering.store.list_usage(key.key_id, limit=1000))
    overspend = max(0, b.spent_nanos - limit)
    print(f"\nadmitted {len(admitted)} of 64 (refusals {len(refused)}), spent {b.spent_nanos} of {limit} "
          f"nano-dollars, overspend {overspend}")
    assert overspend == 0
    assert b.spent_nanos == ledger == sum(admitted) and b.reserved_nanos == 0
    assert len(admitted) >= 7 and refused  # the budget admitted what it could hold, and refused the rest
    assert all(r.reason == REASON_INSUFFICIENT_QUOTA for r in refused)  # the interceptor sends it as ErrorInfo


async def test_tenant_budget_across_keys_never_overspends(metering: Metering) -> None:
    metering.store.set_budget("tenant", "acme", 5 * 135_000)
    keys = [await metering.key(tenant="acme") for _ in range(4)]
    assert all(k.has_budget for k in keys)
    adm = admission(metering)

    async def try_admit(i: int) -> int:
        try:
            await adm.admit(keys[i % 4], MODEL, 100, 200, request_id=f"t-{i}")
            return 1
        except AdmissionRefused:
            return 0

    assert sum(await asyncio.gather(*(try_admit(i) for i in range(40)))) == 5


async def test_access_scopes_and_models(metering: Metering) -> None:
    adm = admission(metering)
    only_other = await metering.key(models=["other-model"])
    with pytest.raises(PermissionDenied) as denied:
        await adm.admit(only_other, MODEL, 1, 1)
    assert denied.value.param == "model"
    admin = await metering.key(scopes=["admin"])
    with pytest.raises(PermissionDenied):
        await adm.admit(admin, MODEL, 1, 1)
    allowed = await metering.key(models=[MODEL.id])
    ticket = await adm.admit(allowed, MODEL, 1, 1)
    assert ticket.reservation_id == "" and ticket.price is not None and ticket.price.version > 0


async def test_rate_limited_refusal_carries_the_headers(metering: Metering) -> None:
    adm = admission(metering)
    key = await metering.key(requests_per_minute=2, tokens_per_minute=10_000)
    ok = await adm.admit(key, MODEL, 10, 10)
    assert dict(ok.headers)["x-ratelimit-remaining-requests"] == "1"
    await adm.admit(key, MODEL, 10, 10)
    with pytest.raises(AdmissionRefused) as refused:
        await adm.admit(key, MODEL, 10, 10)
    md = dict(refused.value.metadata)
    assert md["retry-after"] == "30" and md["x-ratelimit-limit-requests"] == "2"
    assert md["x-ratelimit-remaining-requests"] == "0" and "x-ratelimit-remaining-tokens" in md
    assert ERROR_CODE not in md and refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == REASON_RATE_LIMITED


async def test_settle_prices_the_actual_tokens_and_the_ledger_agrees(metering: Metering) -> None:
    adm = admission(metering)
    key = await metering.key(budget_nanos=10**9)
    ticket = await adm.admit(key, MODEL, 7, 100, request_id="exact-1")
    assert ticket.reserved_nanos == 7 * 150 + 100 * 600
    cost = adm.settle(ticket, 7, 3)  # cancelled after 3 tokens: billed for 3
    assert cost == 7 * 150 + 3 * 600
    reply = await metering.client.record_usage_batch([stamp(record("exact-1", key, 7, 3, "cancelled"), ticket, cost)])
    assert list(reply.outcomes) == [metering_pb2.RECORD_OUTCOME_CREATED]
    [row] = metering.store.list_usage(key.key_id)
    assert (row.cost_nanos, row.price_version, row.cancelled) == (cost, ticket.price_version, True)
    [b] = metering.store.list_budgets()
    assert (b.spent_nanos, b.reserved_nanos) == (cost, 0)


async def test_release_gives_the_reservation_back(metering: Metering) -> None:
    adm = admission(metering)
    key = await metering.key(budget_nanos=135_000)
    async with lease(adm, UsageRecorder(metering.client), key, "never-ran", 100, 200):
        with pytest.raises(AdmissionRefused):
            await adm.admit(key, MODEL, 100, 200, request_id="second")
    # the lease was left before any executor was asked: its reservation is back, and no usage was recorded
    await adm.admit(key, MODEL, 100, 200, request_id="third")
    assert metering.store.list_usage(key.key_id) == []


async def test_budgets_fail_closed_when_metering_is_down(metering: Metering) -> None:
    adm = admission(metering)
    with_budget = await metering.key(budget_nanos=10**9)
    without = await metering.key()
    # the price book's refresh has a 1 s timeout and falls back to the catalog's seed (version 0) when it passes,
    # which a loaded 2-core machine can reach: refresh until metering's price is known, then take metering down
    for _ in range(20):
        await adm.prices.refresh()
        if (known := adm.prices.peek(MODEL.id)) is not None and known.version > 0:
            break
    await metering.server.stop(0)
    with pytest.raises(Unavailable):
        await adm.admit(with_budget, MODEL, 10, 10)
    ticket = await adm.admit(without, MODEL, 10, 10)  # no budget to check: admitted at the last known price
    assert ticket.price is not None and ticket.price.version > 0
    await metering.restart()


async def test_prices_come_from_metering_and_fall_back_to_the_catalog(metering: Metering, tmp_path: Path) -> None:
    book = PriceBook(metering.client, CATALOG, ttl_s=0.0)
    price = await book.get(MODEL.id)
    assert price is not None and price.version > 0
    dead = MeteringClient(grpc.aio.insecure_channel("127.0.0.1:1"))
    offline = PriceBook(dead, CATALOG, timeout_s=0.2)
    seed = await offline.get(MODEL.id)
    assert seed is not None and seed.version == 0 and seed.input_per_million == 150_000_000
    assert offline.pricing_pb(MODEL.id) is not None and offline.pricing_pb("nope") is None


async def test_verify_key_carries_tenancy_and_limits(metering: Metering) -> None:
    expires = datetime(2099, 1, 1, tzinfo=UTC)
    key = await metering.key(tenant="acme", models=["a", "b"], requests_per_minute=5, tokens_per_minute=50,
                             expires_at=expires)
    assert (key.tenant_id, key.models, key.scopes) == ("acme", frozenset({"a", "b"}), frozenset({"inference"}))
    assert (key.requests_per_minute, key.tokens_per_minute, key.has_budget) == (5, 50, False)
    assert key.expires_at == expires.timestamp() and key.may_use("a") and not key.may_use("c")
    assert time.time() < key.expires_at
