"""Killing metering loses nothing: the router's outbox holds the records and replays them when it is back."""

from __future__ import annotations

import asyncio
from pathlib import Path

from inferplane.router.outbox import UsageOutbox, batch_sender
from tests.integration.test_admission import Metering, database_url, metering, record  # noqa: F401  (fixtures)


async def test_records_written_while_metering_is_down_all_arrive_once(metering: Metering,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    key = await metering.key(budget_nanos=10**12)
    box = UsageOutbox(tmp_path / "outbox.db", batch_sender(metering.client, timeout_s=2), batch_size=64,
                      min_backoff_s=0.05, max_backoff_s=0.5)
    box.start()
    await asyncio.gather(*(box.put(record(f"before-{i}", key, 10, i)) for i in range(50)))
    assert await box.flushed(20)

    await metering.server.stop(0)  # metering is killed ...
    await asyncio.gather(*(box.put(record(f"during-{i}", key, 10, i)) for i in range(200)))
    await box.put(record("before-3", key, 10, 999))  # a retried request id: must not count twice
    await asyncio.sleep(0.3)
    assert box.depth() == 201  # held durably, nothing acknowledged

    await metering.restart()  # ... and comes back
    assert await box.flushed(30), f"{box.depth()} records still held"
    await box.stop()

    rows = metering.store.list_usage(key.key_id, limit=1000)
    ids = [r.request_id for r in rows]
    assert len(ids) == len(set(ids)) == 250
    assert next(r for r in rows if r.request_id == "before-3").completion_tokens == 3
    [b] = metering.store.list_budgets()
    assert b.spent_nanos == sum(r.cost_nanos or 0 for r in rows) > 0
