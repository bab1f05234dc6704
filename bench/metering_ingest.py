"""Usage-ledger ingestion rate: records/s into SQLite and PostgreSQL, one by one and in batches.

    python -m bench.metering_ingest [--records 5000] [--batch 500] [--postgres URL] [--no-grpc]

For each database: the store alone (``record_usage`` one record per transaction, then ``record_usage_batch``),
and through metering's gRPC server on loopback (``RecordUsage`` per record, then ``RecordUsageBatch``, the
router outbox's path). Every record is priced and its key has a budget, so each write also settles a budget,
as in production. PostgreSQL is skipped when it cannot be reached. Prints figures; never fails on a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from inferplane.common.money import PriceNanos
from inferplane.common.settings import ServerSettings
from inferplane.metering.main import MeteringSettings, build_server
from inferplane.metering.store import MeteringStore, UsageRow
from inferplane.v1 import metering_pb2, metering_pb2_grpc

SECRET = b"bench-secret-0123456789abcdef0123"
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def rows(prefix: str, key_id: str, n: int) -> list[UsageRow]:
    now = datetime.now(UTC)
    return [UsageRow(request_id=f"{prefix}-{i}", key_id=key_id, model="tiny-llama", prompt_tokens=100 + i % 50,
                     completion_tokens=i % 200, finish_reason="stop", latency_ms=20, created_at=now,
                     time_to_first_token_ms=3, price_version=0) for i in range(n)]


def pb(row: UsageRow) -> metering_pb2.UsageRecord:
    rec = metering_pb2.UsageRecord(request_id=row.request_id, key_id=row.key_id, model=row.model,
                                   prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
                                   finish_reason=row.finish_reason, latency_ms=row.latency_ms)
    rec.created_at.FromDatetime(row.created_at)
    return rec


def timed(n: int, fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return n / (time.perf_counter() - started)


def prepare(url: str) -> tuple[MeteringStore, str]:
    store = MeteringStore(url, SECRET)
    store.migrate()
    price = store.set_price("tiny-llama", PriceNanos(150_000_000, 600_000_000))
    key, _ = store.create_key("bench")
    store.set_budget("key", key.key_id, 10**15)
    assert price.price.version
    return store, key.key_id


async def over_grpc(store: MeteringStore, key_id: str, n: int, batch: int, tmp: Path) -> dict[str, float]:
    settings = MeteringSettings(server=ServerSettings(port=0), database_url="sqlite://", secret_file=tmp / "s",
                                catalog=None)
    server = build_server(settings, store=store)
    await server.start()
    out: dict[str, float] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = metering_pb2_grpc.MeteringServiceStub(channel)
            single = [pb(r) for r in rows("g1", key_id, max(1, n // 5))]
            started = time.perf_counter()
            for rec in single:
                await stub.RecordUsage(metering_pb2.RecordUsageRequest(record=rec), timeout=30)
            out["grpc_single"] = len(single) / (time.perf_counter() - started)
            batched = [pb(r) for r in rows("gb", key_id, n)]
            started = time.perf_counter()
            for i in range(0, n, batch):
                await stub.RecordUsageBatch(metering_pb2.RecordUsageBatchRequest(records=batched[i:i + batch]),
                                            timeout=60)
            out["grpc_batch"] = n / (time.perf_counter() - started)
    finally:
        await server.stop(0)
    return out


def measure(name: str, url: str, n: int, batch: int, use_grpc: bool) -> dict[str, float]:
    store, key_id = prepare(url)
    single_n = max(1, n // 5)  # one transaction per record is slow: measure fewer
    single = rows("s", key_id, single_n)
    result = {"store_single": timed(single_n, lambda: [store.record_usage(r) for r in single])}
    batched = rows("b", key_id, n)
    result["store_batch"] = timed(n, lambda: [store.record_usage_batch(batched[i:i + batch])
                                              for i in range(0, n, batch)])
    if use_grpc:
        with tempfile.TemporaryDirectory() as tmp:
            result.update(asyncio.run(over_grpc(store, key_id, n, batch, Path(tmp))))
    [budget] = store.list_budgets()
    written = (single_n + n) * (2 if use_grpc else 1)
    if written <= 1000:  # one page of list_usage holds them all: the budget's spend equals the records' cost
        assert budget.spent_nanos == sum(r.cost_nanos or 0 for r in store.list_usage(key_id, limit=1000))
    store.close()
    print(f"{name:10s} " + "  ".join(f"{k} {v:9,.0f} rec/s" for k, v in result.items()), flush=True)
    return result


def postgres_database(base: str) -> tuple[str, Callable[[], None]] | None:
    try:
        admin = create_engine(base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        name = f"inferplane_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        print(f"postgresql skipped: {type(exc).__name__}", file=sys.stderr)
        return None

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return make_url(base).set(database=name).render_as_string(hide_password=False), drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--postgres", default=DEFAULT_PG)
    parser.add_argument("--no-grpc", action="store_true")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = measure("sqlite", f"sqlite:///{Path(tmp) / 'bench.db'}", args.records, args.batch,
                                    not args.no_grpc)
    pg = postgres_database(args.postgres)
    if pg is not None:
        url, drop = pg
        try:
            results["postgresql"] = measure("postgresql", url, args.records, args.batch, not args.no_grpc)
        finally:
            drop()
    print(json.dumps({"records": args.records, "batch": args.batch, "records_per_s": results}))


if __name__ == "__main__":
    main()
