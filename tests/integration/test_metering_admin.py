"""Metering's admin API over real gRPC (admin keys only), usage summaries scoped to the caller, and the CLI."""

from __future__ import annotations

import argparse
import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import yaml

from inferplane.metering.cli import register
from inferplane.v1 import metering_pb2, metering_pb2_grpc
from tests.integration.test_admission import Metering, database_url, metering, record  # noqa: F401  (fixtures)


def stub(m: Metering) -> metering_pb2_grpc.MeteringServiceStub:
    return metering_pb2_grpc.MeteringServiceStub(m.channel)


def bearer(plain: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {plain}"),)


async def test_admin_calls_need_an_admin_key(metering: Metering) -> None:  # noqa: F811
    s = stub(metering)
    _, admin = metering.store.create_key("ops", scopes=["admin"])
    _, user = metering.store.create_key("user")
    for md, code in (((), grpc.StatusCode.UNAUTHENTICATED), (bearer("sk-ip-nonsense"), grpc.StatusCode.UNAUTHENTICATED),
                     (bearer(user), grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.ListKeys(metering_pb2.ListKeysRequest(), metadata=md, timeout=5)
        assert err.value.code() == code
    created = await s.CreateKey(metering_pb2.CreateKeyRequest(
        name="svc", tenant_id="acme", models=["tiny-llama"], requests_per_minute=30,
        budget=metering_pb2.Budget(limit_nanodollars=5_000_000_000, period=metering_pb2.BUDGET_PERIOD_DAILY)),
        metadata=bearer(admin), timeout=5)
    assert created.api_key.startswith(f"sk-ip-{created.key.key_id}-")
    verified = await s.VerifyKey(metering_pb2.VerifyKeyRequest(api_key=created.api_key), timeout=5)
    assert (verified.tenant_id, list(verified.models), verified.requests_per_minute, verified.has_budget) == (
        "acme", ["tiny-llama"], 30, True)
    listed = await s.ListKeys(metering_pb2.ListKeysRequest(tenant_id="acme"), metadata=bearer(admin), timeout=5)
    assert [k.key_id for k in listed.keys] == [created.key.key_id]
    budgets = await s.ListBudgets(metering_pb2.ListBudgetsRequest(), metadata=bearer(admin), timeout=5)
    assert [(b.subject_id, b.limit_nanodollars, b.period) for b in budgets.budgets] == [
        (created.key.key_id, 5_000_000_000, metering_pb2.BUDGET_PERIOD_DAILY)]
    revoked = await s.RevokeKey(metering_pb2.RevokeKeyRequest(key_id=created.key.key_id), metadata=bearer(admin),
                                timeout=5)
    assert revoked.HasField("revoked_at")
    me = await s.WhoAmI(metering_pb2.WhoAmIRequest(), metadata=bearer(user), timeout=5)
    assert list(me.scopes) == ["inference"]


async def test_set_price_versions_and_bad_prices(metering: Metering) -> None:  # noqa: F811
    s = stub(metering)
    _, admin = metering.store.create_key("ops", scopes=["admin"])
    before = (await s.ListPrices(metering_pb2.ListPricesRequest(), timeout=5)).prices
    price = await s.SetPrice(metering_pb2.SetPriceRequest(model="tiny-llama", input_per_million_nanodollars=1,
                                                          per_request_nanodollars=1_000), metadata=bearer(admin),
                             timeout=5)
    assert price.version > before[0].version and price.source == "admin"
    history = (await s.ListPrices(metering_pb2.ListPricesRequest(include_history=True), timeout=5)).prices
    assert [p.version for p in history] == [before[0].version, price.version]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SetPrice(metering_pb2.SetPriceRequest(model="tiny-llama", per_request_nanodollars=999),
                         metadata=bearer(admin), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    cached = await s.SetPrice(metering_pb2.SetPriceRequest(model="tiny-llama", input_per_million_nanodollars=100,
                                                           cached_input_per_million_nanodollars=25),
                              metadata=bearer(admin), timeout=5)
    assert cached.HasField("cached_input_per_million_nanodollars") and cached.cached_input_per_million_nanodollars == 25
    assert not price.HasField("cached_input_per_million_nanodollars")  # none set: the input price applies
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a cached price above the input price
        await s.SetPrice(metering_pb2.SetPriceRequest(model="tiny-llama", input_per_million_nanodollars=100,
                                                      cached_input_per_million_nanodollars=101),
                         metadata=bearer(admin), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cached_input" in (err.value.details() or "")


async def test_a_key_reads_only_its_own_usage(metering: Metering) -> None:  # noqa: F811
    s = stub(metering)
    a_info, a = metering.store.create_key("a", tenant_id="t1")
    b_info, _ = metering.store.create_key("b", tenant_id="t2")
    _, admin = metering.store.create_key("ops", scopes=["admin"])
    key_a = await metering.client.verify_key(a, timeout=5)
    key_b = await metering.client.verify_key(metering.store.create_key("b2", tenant_id="t2")[1], timeout=5)
    await metering.client.record_usage_batch([record("ua", key_a, 10, 5), record("ub", key_b, 10, 5)])
    # whatever it asks for, a plain key gets its own rows only
    mine = await s.GetUsageSummary(metering_pb2.GetUsageSummaryRequest(key_id=key_b.key_id, tenant_id="t2"),
                                   metadata=bearer(a), timeout=5)
    assert {r.key_id for r in mine.rows} == {a_info.key_id}
    everyone = await s.GetUsageSummary(metering_pb2.GetUsageSummaryRequest(), metadata=bearer(admin), timeout=5)
    assert {r.key_id for r in everyone.rows} == {a_info.key_id, key_b.key_id}
    tenant = await s.GetUsageSummary(metering_pb2.GetUsageSummaryRequest(tenant_id="t2"), metadata=bearer(admin),
                                     timeout=5)
    assert {r.tenant_id for r in tenant.rows} == {"t2"} and b_info.key_id not in {r.key_id for r in tenant.rows}
    assert mine.rows[0].cost_nanodollars == 10 * 150 + 5 * 600


async def test_record_usage_batch_reports_each_outcome(metering: Metering) -> None:  # noqa: F811
    key = await metering.key()
    bad = record("bad", key, -1, 0)
    reply = await metering.client.record_usage_batch([record("x", key, 1, 1), bad, record("x", key, 2, 2)])
    assert list(reply.outcomes) == [metering_pb2.RECORD_OUTCOME_CREATED, metering_pb2.RECORD_OUTCOME_INVALID,
                                    metering_pb2.RECORD_OUTCOME_DUPLICATE]
    assert "prompt_tokens" in reply.errors[1] and reply.errors[0] == ""
    one = await stub(metering).RecordUsage(metering_pb2.RecordUsageRequest(record=record("x", key, 9, 9)), timeout=5)
    assert not one.created and one.cost_nanodollars == 150 + 600


# ---- CLI -----------------------------------------------------------------------------------------


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="inferplane")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "inferplane.yaml"
    path.write_text(yaml.safe_dump({"metering": {"database_url": f"sqlite:///{tmp_path / 'm.db'}",
                                                 "secret_file": str(tmp_path / "secret")}}))
    return path


def test_cli_keys_prices_budgets_usage(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = str(config)
    assert cli("keys", "create", "--name", "svc", "--tenant", "acme", "--models", "tiny-llama,other",
               "--expires", "30d", "--budget", "2.50", "--budget-period", "daily", "--rpm", "60", "--tpm", "1000",
               "--config", c) == 0
    out, err = capsys.readouterr()
    plain = out.strip()
    key_id = plain[6:18]
    assert "tenant acme" in err and plain not in err
    assert cli("keys", "create", "--name", "ops", "--admin", "--config", c) == 0
    assert "admin key" in capsys.readouterr().err
    assert cli("keys", "list", "--tenant", "acme", "--config", c) == 0
    table = capsys.readouterr().out
    assert key_id in table and "other,tiny-llama" in table and "ops" not in table and plain not in table

    assert cli("prices", "set", "tiny-llama", "--input", "0.15", "--output", "0.60", "--config", c) == 0
    assert "version" in capsys.readouterr().out
    assert cli("prices", "set", "tiny-llama", "--input", "0.0000000001", "--output", "1", "--config", c) == 2
    assert "nano-dollar" in capsys.readouterr().err
    assert cli("prices", "list", "--config", c) == 0
    assert "0.15" in capsys.readouterr().out
    assert cli("prices", "set", "tiny-llama", "--input", "0.15", "--cached-input", "0.16", "--output", "0.6",
               "--config", c) == 2
    assert "cached_input_per_million" in capsys.readouterr().err

    assert cli("budgets", "set", "--tenant", "acme", "--limit", "100", "--config", c) == 0
    assert cli("budgets", "list", "--config", c) == 0
    budgets = capsys.readouterr().out
    assert "2.5" in budgets and "daily" in budgets and "acme" in budgets

    from inferplane.metering.main import MeteringSettings, open_store
    from inferplane.metering.store import UsageRow

    store = open_store(MeteringSettings(**yaml.safe_load(config.read_text())["metering"]))
    now = datetime.now(UTC)
    for i in range(3):
        store.record_usage(UsageRow(request_id=f"u{i}", key_id=key_id, model="tiny-llama", prompt_tokens=1000,
                                    completion_tokens=1000, finish_reason="stop", latency_ms=1, cached_tokens=100 * i,
                                    created_at=now + timedelta(milliseconds=i)))  # after the price was set
    store.close()
    assert cli("usage", "--summary", "--csv", "--since", "1d", "--config", c) == 0
    [row] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert (row["key_id"], row["requests"], row["tier"], row["cached"]) == (key_id, "3", "default", "300")
    assert row["cost_usd"] == "0.00225"  # no cached-input price: cached tokens at the input price
    assert cli("usage", "--json", "--tenant", "acme", "--config", c) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and rows[0]["cost"] == "0.00075" and rows[0]["tenant_id"] == "acme"
    assert cli("usage", "--since", "yesterday", "--config", c) == 2
