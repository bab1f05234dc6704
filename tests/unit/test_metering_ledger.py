"""The metering store beyond the first cut: tenancy, versioned prices, costs in the ledger, budgets.

Runs on a real SQLite file here; ``tests/integration/test_postgres_store.py`` runs every test of this module
again on PostgreSQL (it overrides the ``database_url`` fixture).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import update

from inferplane.common.errors import InvalidArgument, Unauthenticated
from inferplane.common.money import PriceNanos
from inferplane.metering.schema import BudgetRow, ReservationRow
from inferplane.metering.store import BudgetExceeded, MeteringStore, UsageRow

SECRET = b"ledger-test-secret-0123456789abcdef"
PRICE = PriceNanos(input_per_million=150_000_000, output_per_million=600_000_000)  # $0.15 / $0.60 per M tokens


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'metering.db'}"


@pytest.fixture
def store(database_url: str) -> Iterator[MeteringStore]:
    s = MeteringStore(database_url, SECRET)
    s.migrate()
    yield s
    s.close()


def usage(request_id: str, key_id: str, *, prompt: int = 1000, completion: int = 500, at: datetime | None = None,
          **kw: object) -> UsageRow:
    fields: dict[str, object] = dict(request_id=request_id, key_id=key_id, model="tiny-llama", prompt_tokens=prompt,
                                     completion_tokens=completion, finish_reason="stop", latency_ms=10,
                                     created_at=at or datetime.now(UTC))
    fields.update(kw)
    return UsageRow(**fields)  # type: ignore[arg-type]


def budget(store: MeteringStore, scope: str, subject: str) -> tuple[int, int]:
    [b] = [b for b in store.list_budgets() if (b.scope, b.subject_id) == (scope, subject)]
    return b.spent_nanos, b.reserved_nanos


# ---- keys and tenancy ----------------------------------------------------------------------------------


def test_key_facts_round_trip_and_list_by_tenant(store: MeteringStore) -> None:
    expires = datetime.now(UTC) + timedelta(days=30)
    info, plain = store.create_key("svc", tenant_id="acme", models=["tiny-llama", "tiny-llama", " b "],
                                   expires_at=expires, requests_per_minute=60, tokens_per_minute=10_000)
    assert (info.tenant_id, info.models, info.scopes) == ("acme", ("b", "tiny-llama"), ("inference",))
    assert (info.requests_per_minute, info.tokens_per_minute) == (60, 10_000)
    verified = store.verify_key(plain)
    assert verified == info and verified.expires_at == expires.replace(microsecond=verified.expires_at.microsecond)
    admin, _ = store.create_key("ops", scopes=["admin"])
    assert admin.is_admin and not info.is_admin and admin.tenant_id == "default"
    assert [k.key_id for k in store.list_keys("acme")] == [info.key_id]
    assert {k.key_id for k in store.list_keys()} == {info.key_id, admin.key_id}


def test_expired_keys_do_not_verify(store: MeteringStore) -> None:
    _, plain = store.create_key("old", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(Unauthenticated):
        store.verify_key(plain)


@pytest.mark.parametrize("kw", [{"tenant_id": "bad tenant"}, {"tenant_id": "-x"}, {"scopes": ["root"]},
                                {"requests_per_minute": 0}, {"tokens_per_minute": -5},
                                {"expires_at": datetime(2030, 1, 1)}])
def test_bad_key_options_are_refused(store: MeteringStore, kw: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        store.create_key("x", **kw)  # type: ignore[arg-type]


# ---- prices --------------------------------------------------------------------------------------------


def test_a_price_change_never_rewrites_history(store: MeteringStore) -> None:
    key, _ = store.create_key("k")
    v1 = store.set_price("tiny-llama", PRICE)
    assert store.record_usage(usage("before", key.key_id, price_version=v1.price.version))
    v2 = store.set_price("tiny-llama", PriceNanos(input_per_million=10**9, output_per_million=2 * 10**9))
    assert v2.price.version > v1.price.version
    assert store.record_usage(usage("after", key.key_id, price_version=v2.price.version))
    # a record admitted at v1 but arriving after the change is still charged at v1
    assert store.record_usage(usage("late", key.key_id, price_version=v1.price.version))
    rows = {r.request_id: r for r in store.list_usage()}
    assert rows["before"].cost_nanos == rows["late"].cost_nanos == 1000 * 150 + 500 * 600  # 450,000 nano-dollars
    assert rows["after"].cost_nanos == 1000 * 1000 + 500 * 2000
    assert (rows["before"].price_version, rows["after"].price_version) == (v1.price.version, v2.price.version)
    assert [p.price.version for p in store.price_history()] == [v1.price.version, v2.price.version]
    assert store.current_prices()["tiny-llama"].price.version == v2.price.version


def test_cached_prompt_tokens_are_stored_and_charged_at_the_cached_price(store: MeteringStore) -> None:
    key, _ = store.create_key("k")
    cheap = PriceNanos(input_per_million=150_000_000, output_per_million=600_000_000,
                       cached_input_per_million=30_000_000)
    v = store.set_price("tiny-llama", cheap)
    assert store.current_prices()["tiny-llama"].price.cached_input_per_million == 30_000_000
    store.record_usage(usage("warm", key.key_id, prompt=300, completion=10, price_version=v.price.version,
                             cached_tokens=288))
    store.record_usage(usage("cold", key.key_id, prompt=300, completion=10, price_version=v.price.version))
    rows = {r.request_id: r for r in store.list_usage()}
    assert (rows["warm"].cached_tokens, rows["cold"].cached_tokens) == (288, 0)
    assert rows["warm"].cost_nanos == 12 * 150 + 288 * 30 + 10 * 600  # 16,440 nano-dollars
    assert rows["cold"].cost_nanos == 300 * 150 + 10 * 600
    with pytest.raises(InvalidArgument, match="cached_tokens"):
        usage("bad", key.key_id, prompt=3, cached_tokens=4)


def test_a_record_without_a_price_version_is_charged_at_the_price_in_force_when_accepted(
        store: MeteringStore) -> None:
    key, _ = store.create_key("k")
    store.set_price("tiny-llama", PRICE)
    accepted = datetime.now(UTC)
    store.set_price("tiny-llama", PriceNanos(input_per_million=10**9))
    store.record_usage(usage("replayed", key.key_id, at=accepted + timedelta(microseconds=1)))
    store.record_usage(usage("ancient", key.key_id, at=accepted - timedelta(days=365)))  # before any price
    rows = {r.request_id: r for r in store.list_usage()}
    assert rows["replayed"].cost_nanos == 450_000
    assert rows["ancient"].cost_nanos == 0 and rows["ancient"].price_version == 0


def test_the_ledger_trusts_its_own_arithmetic_not_the_callers(store: MeteringStore) -> None:
    key, _ = store.create_key("k")
    v = store.set_price("tiny-llama", PRICE)
    store.record_usage(usage("r", key.key_id, price_version=v.price.version, cost_nanos=1))
    assert store.list_usage()[0].cost_nanos == 450_000


def test_seeding_from_the_catalog(store: MeteringStore) -> None:
    [seeded] = store.seed_prices({"tiny-llama": PRICE})
    assert seeded.source == "catalog"
    assert store.seed_prices({"tiny-llama": PRICE}) == []  # unchanged file: nothing new
    changed = PriceNanos(input_per_million=200_000_000, output_per_million=600_000_000)
    [edited] = store.seed_prices({"tiny-llama": changed})  # the file was edited: a new version
    assert edited.price.version > seeded.price.version
    store.set_price("tiny-llama", PRICE)  # an admin sets it: the catalog no longer overrides it
    assert store.seed_prices({"tiny-llama": changed}) == []
    assert store.current_prices()["tiny-llama"].source == "admin"


# ---- the ledger ----------------------------------------------------------------------------------------


def test_batch_is_idempotent_on_request_id_within_and_across_batches(store: MeteringStore) -> None:
    key, _ = store.create_key("k", tenant_id="acme")
    store.set_price("tiny-llama", PRICE)
    first = store.record_usage_batch([usage("a", key.key_id), usage("b", key.key_id, prompt=1),
                                      usage("a", key.key_id, prompt=99)])
    assert [r.created for r in first] == [True, True, False]
    again = store.record_usage_batch([usage("b", key.key_id, prompt=5), usage("c", key.key_id)])
    assert [r.created for r in again] == [False, True]
    assert again[0].cost_nanos == 1 * 150 + 500 * 600  # the ledger's cost of the first "b"
    assert store.count_usage() == 3
    rows = {r.request_id: r for r in store.list_usage()}
    assert rows["a"].prompt_tokens == 1000 and rows["b"].prompt_tokens == 1
    assert {r.tenant_id for r in rows.values()} == {"acme"}  # from the key, not from the record


def test_cancelled_requests_are_billed_for_what_was_generated(store: MeteringStore) -> None:
    key, _ = store.create_key("k")
    store.set_price("tiny-llama", PRICE)
    store.record_usage(usage("c", key.key_id, completion=3, finish_reason="cancelled"))
    [row] = store.list_usage()
    assert row.cancelled and row.cost_nanos == 1000 * 150 + 3 * 600


def test_usage_summary_by_day_model_and_key_with_a_range(store: MeteringStore) -> None:
    a, _ = store.create_key("a", tenant_id="t1")
    b, _ = store.create_key("b", tenant_id="t2")
    v = store.set_price("tiny-llama", PRICE).price.version
    day1 = datetime(2025, 12, 1, 23, 59, 59, tzinfo=UTC)
    day2 = datetime(2025, 12, 2, 0, 0, 1, tzinfo=UTC)
    store.record_usage_batch([
        usage("1", a.key_id, at=day1, price_version=v), usage("2", a.key_id, at=day1 - timedelta(hours=1),
                                                               price_version=v),
        usage("3", a.key_id, at=day2, finish_reason="cancelled", completion=1),
        usage("4", b.key_id, at=day2), usage("5", a.key_id, at=day2, model="other"),
    ])
    start, end = datetime(2025, 12, 1, tzinfo=UTC), datetime(2025, 12, 3, tzinfo=UTC)
    rows = store.usage_summary(start=start, end=end)
    got = [(r.day, r.key_id, r.model, r.requests, r.prompt_tokens, r.completion_tokens, r.cancelled_requests)
           for r in rows]
    assert got == sorted([("2025-12-01", a.key_id, "tiny-llama", 2, 2000, 1000, 0),
                          ("2025-12-02", a.key_id, "other", 1, 1000, 500, 0),
                          ("2025-12-02", a.key_id, "tiny-llama", 1, 1000, 1, 1),
                          ("2025-12-02", b.key_id, "tiny-llama", 1, 1000, 500, 0)], key=lambda t: (t[0], t[1], t[2]))
    assert rows[0].cost_nanos == 2 * 450_000 and rows[0].tenant_id == "t1"
    assert [r.key_id for r in store.usage_summary(start=start, end=end, tenant_id="t2")] == [b.key_id]
    assert [r.day for r in store.usage_summary(start=day2, end=end, key_id=a.key_id)] == ["2025-12-02"] * 2
    with pytest.raises(InvalidArgument):
        store.usage_summary(start=end, end=start)


def test_summaries_total_cached_tokens_and_split_by_the_tier_that_served(store: MeteringStore) -> None:
    key, _ = store.create_key("k")
    v = store.set_price("tiny-llama", PriceNanos(input_per_million=150_000_000, output_per_million=600_000_000,
                                                 cached_input_per_million=30_000_000)).price.version
    at = datetime(2025, 12, 1, 12, tzinfo=UTC)
    store.record_usage_batch([
        usage("d1", key.key_id, at=at, prompt=300, completion=10, price_version=v, cached_tokens=288,
              service_tier="default"),
        usage("d2", key.key_id, at=at, prompt=7, completion=3, price_version=v, cached_tokens=5),  # "": default
        usage("f1", key.key_id, at=at, prompt=300, completion=10, price_version=v, cached_tokens=100,
              service_tier="flex", tier_multiplier=Decimal("0.5")),
        usage("p1", key.key_id, at=at, prompt=11, completion=2, price_version=v, service_tier="priority",
              tier_multiplier=Decimal("2")),
    ])
    listed = {r.request_id: r.service_tier for r in store.list_usage()}
    assert listed == {"d1": "default", "d2": "default", "f1": "flex", "p1": "priority"}
    rows = store.usage_summary(start=at - timedelta(hours=1), end=at + timedelta(hours=1))
    got = {r.service_tier: (r.requests, r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.cost_nanos)
           for r in rows}
    assert [r.service_tier for r in rows] == ["default", "flex", "priority"]
    assert got == {
        "default": (2, 307, 293, 13, (12 * 150 + 288 * 30 + 10 * 600) + (2 * 150 + 5 * 30 + 3 * 600)),
        "flex": (1, 300, 100, 10, (200 * 150 + 100 * 30 + 10 * 600) // 2),
        "priority": (1, 11, 0, 2, (11 * 150 + 2 * 600) * 2),
    }
    with pytest.raises(InvalidArgument, match="service_tier"):
        usage("bad", key.key_id, service_tier="auto")  # a request asks for "auto"; it is served at a tier


def test_list_usage_filters(store: MeteringStore) -> None:
    a, _ = store.create_key("a", tenant_id="t1")
    b, _ = store.create_key("b", tenant_id="t2")
    t0 = datetime(2025, 12, 1, tzinfo=UTC)
    store.record_usage_batch([usage(f"r{i}", (a, b)[i % 2].key_id, at=t0 + timedelta(hours=i)) for i in range(6)])
    assert [r.request_id for r in store.list_usage(tenant_id="t1")] == ["r4", "r2", "r0"]
    assert [r.request_id for r in store.list_usage(start=t0 + timedelta(hours=2), end=t0 + timedelta(hours=4))] \
        == ["r3", "r2"]


# ---- budgets -------------------------------------------------------------------------------------------


def test_reserve_then_settle_with_the_usage_record(store: MeteringStore) -> None:
    key, _ = store.create_key("k")
    store.set_price("tiny-llama", PRICE)
    store.set_budget("key", key.key_id, 1_000_000)
    held = store.reserve("req-1", key.key_id, "tiny-llama", 1000, 1000)  # worst case: 150,000 + 600,000
    assert held.reserved_nanos == 750_000 and held.price is not None
    assert budget(store, "key", key.key_id) == (0, 750_000)
    with pytest.raises(BudgetExceeded) as refused:
        store.reserve("req-2", key.key_id, "tiny-llama", 1000, 1000)
    assert refused.value.refusal.available_nanos == 250_000 and "budget" in refused.value.message
    assert budget(store, "key", key.key_id) == (0, 750_000)  # a refusal holds nothing
    store.record_usage(usage("req-1", key.key_id, completion=100, price_version=held.price.price.version,
                             reservation_id="req-1"))
    assert budget(store, "key", key.key_id) == (150_000 + 60_000, 0)
    store.record_usage(usage("req-1", key.key_id, completion=100, reservation_id="req-1"))  # a replay: no change
    assert budget(store, "key", key.key_id) == (210_000, 0)
    assert store.reserve("req-2", key.key_id, "tiny-llama", 1000, 1000).reserved_nanos == 750_000


def test_reserve_is_idempotent_and_release_gives_back(store: MeteringStore) -> None:
    key, _ = store.create_key("k")
    store.set_price("tiny-llama", PRICE)
    store.set_budget("key", key.key_id, 10_000_000)
    store.reserve("r", key.key_id, "tiny-llama", 1000, 1000)
    store.reserve("r", key.key_id, "tiny-llama", 1000, 1000)  # a retried Reserve holds once
    assert budget(store, "key", key.key_id) == (0, 750_000)
    assert store.release("r") is True and store.release("r") is False
    assert budget(store, "key", key.key_id) == (0, 0)


def test_no_budget_holds_nothing(store: MeteringStore) -> None:
    key, _ = store.create_key("k")
    store.set_price("tiny-llama", PRICE)
    assert store.reserve("r", key.key_id, "tiny-llama", 10, 10).reserved_nanos == 20 * 0 + 1500 + 6000
    assert not store.has_budget(key.key_id, key.tenant_id)
    assert store.release("r") is False  # nothing was held


def test_tenant_budget_is_shared_by_its_keys(store: MeteringStore) -> None:
    a, _ = store.create_key("a", tenant_id="acme")
    b, _ = store.create_key("b", tenant_id="acme")
    other, _ = store.create_key("c", tenant_id="else")
    store.set_price("tiny-llama", PRICE)
    store.set_budget("tenant", "acme", 1_000_000)
    assert store.has_budget(a.key_id, "acme") and not store.has_budget(other.key_id, "else")
    store.reserve("1", a.key_id, "tiny-llama", 1000, 1000)
    with pytest.raises(BudgetExceeded) as refused:
        store.reserve("2", b.key_id, "tiny-llama", 1000, 1000)
    assert refused.value.refusal.scope == "tenant"
    store.reserve("3", other.key_id, "tiny-llama", 1000, 1000)  # another tenant is not affected


def test_key_and_tenant_budgets_both_hold_or_neither(store: MeteringStore) -> None:
    key, _ = store.create_key("a", tenant_id="acme")
    store.set_price("tiny-llama", PRICE)
    store.set_budget("key", key.key_id, 10_000_000)
    store.set_budget("tenant", "acme", 1_000_000)
    store.reserve("1", key.key_id, "tiny-llama", 1000, 1000)
    with pytest.raises(BudgetExceeded):
        store.reserve("2", key.key_id, "tiny-llama", 1000, 1000)  # the tenant's refuses; the key's is rolled back
    assert budget(store, "key", key.key_id) == (0, 750_000)
    assert budget(store, "tenant", "acme") == (0, 750_000)


def test_expired_reservations_are_given_back(store: MeteringStore) -> None:
    key, _ = store.create_key("k")
    store.set_price("tiny-llama", PRICE)
    store.set_budget("key", key.key_id, 1_000_000)
    store.reserve("crashed", key.key_id, "tiny-llama", 1000, 1000)
    with store._write() as session:  # the router that held it crashed long ago
        session.execute(update(ReservationRow).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert store.sweep_reservations() == 1
    assert budget(store, "key", key.key_id) == (0, 0)
    store.reserve("again", key.key_id, "tiny-llama", 1000, 1000)
    with store._write() as session:
        session.execute(update(ReservationRow).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    store.reserve("next", key.key_id, "tiny-llama", 1000, 1000)  # admission sweeps before it reserves
    assert budget(store, "key", key.key_id) == (0, 750_000)


def test_a_new_period_starts_from_zero_and_old_requests_count_in_none(store: MeteringStore) -> None:
    key, _ = store.create_key("k")
    store.set_price("tiny-llama", PRICE)
    store.set_budget("key", key.key_id, 1_000_000, period="daily")
    store.record_usage(usage("today", key.key_id))
    assert budget(store, "key", key.key_id) == (450_000, 0)
    yesterday = datetime.now(UTC) - timedelta(days=1)
    with store._write() as session:  # pretend the period began yesterday
        session.execute(update(BudgetRow).values(period_start=yesterday.replace(hour=0, minute=0, second=0,
                                                                               microsecond=0)))
    assert budget(store, "key", key.key_id) == (0, 0)  # rolled over
    store.record_usage(usage("from-yesterday", key.key_id, at=yesterday))  # accepted in the old period
    assert budget(store, "key", key.key_id) == (0, 0)


def test_set_budget_validation_and_update(store: MeteringStore) -> None:
    key, _ = store.create_key("k")
    for args in (("user", key.key_id, 1), ("key", key.key_id, 0), ("key", key.key_id, 5, "weekly")):
        with pytest.raises(InvalidArgument):
            store.set_budget(*args)  # type: ignore[arg-type]
    store.set_budget("key", key.key_id, 5)
    info = store.set_budget("key", key.key_id, 9, "daily")
    assert (info.limit_nanos, info.period) == (9, "daily") and len(store.list_budgets()) == 1


def test_concurrent_reservations_never_overspend(store: MeteringStore, database_url: str) -> None:
    key, _ = store.create_key("k")
    store.set_price("tiny-llama", PRICE)
    store.set_budget("key", key.key_id, 10 * 750_000 + 1)
    second = MeteringStore(database_url, SECRET)  # a second process's view of the same database
    held: list[str] = []
    refused: list[str] = []
    barrier = threading.Barrier(16)

    def worker(i: int) -> None:
        target = store if i % 2 else second
        barrier.wait(timeout=10)
        for j in range(4):
            rid = f"{i}-{j}"
            try:
                target.reserve(rid, key.key_id, "tiny-llama", 1000, 1000)
                held.append(rid)
            except BudgetExceeded:
                refused.append(rid)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    second.close()
    assert len(held) == 10 and len(refused) == 54
    assert budget(store, "key", key.key_id) == (0, 7_500_000)
