"""The usage outbox on a real SQLite file, with a scripted sender (the test is about the outbox's own logic)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from inferplane.router.outbox import UsageOutbox
from inferplane.v1 import metering_pb2


def rec(request_id: str, completion: int = 1) -> metering_pb2.UsageRecord:
    return metering_pb2.UsageRecord(request_id=request_id, key_id="k" * 12, model="m", prompt_tokens=1,
                                    completion_tokens=completion, finish_reason="stop")


class Sender:
    """Acknowledges batches once ``up``; records what it was sent."""

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.batches: list[list[str]] = []
        self.failures = 0
        self.failed_thrice = asyncio.Event()
        self.delivered: dict[str, int] = {}

    async def __call__(self, records: list[metering_pb2.UsageRecord]) -> None:
        if not self.up:
            self.failures += 1
            if self.failures >= 3:
                self.failed_thrice.set()
            raise ConnectionError("metering is down")
        self.batches.append([r.request_id for r in records])
        for r in records:
            self.delivered.setdefault(r.request_id, r.completion_tokens)


async def test_put_is_durable_before_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = UsageOutbox(path, Sender(up=False))
    await asyncio.gather(*(box.put(rec(f"r{i}")) for i in range(50)))
    assert box.depth() == 50
    # A second process opening the file now (as a restarted router would) sees every record.
    other = UsageOutbox(path, Sender())
    assert other.depth() == 50
    await other.stop()
    await box.stop(drain_timeout_s=0)


async def test_replays_in_batches_once_metering_is_back(tmp_path: Path) -> None:
    sender = Sender(up=False)
    box = UsageOutbox(tmp_path / "outbox.db", sender, batch_size=7, min_backoff_s=0.01, max_backoff_s=0.05)
    box.start()
    for i in range(30):
        await box.put(rec(f"r{i}"))
    await asyncio.wait_for(sender.failed_thrice.wait(), 10)  # retried with backoff while down
    assert box.depth() == 30 and not sender.batches
    sender.up = True
    assert await box.flushed(10)
    assert box.depth() == 0 and sorted(sender.delivered) == sorted(f"r{i}" for i in range(30))
    assert max(len(b) for b in sender.batches) <= 7
    await box.stop()


async def test_idempotent_on_request_id(tmp_path: Path) -> None:
    sender = Sender(up=False)
    box = UsageOutbox(tmp_path / "outbox.db", sender)
    await box.put(rec("same", completion=1))
    await box.put(rec("same", completion=99))  # a retry of the same request: the first record is kept
    assert box.depth() == 1
    sender.up = True
    box.start()
    assert await box.flushed(10)
    assert sender.delivered == {"same": 1}
    await box.stop()


async def test_a_killed_router_replays_its_file_when_it_starts_again(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    crashed = UsageOutbox(path, Sender(up=False))
    for i in range(5):
        await crashed.put(rec(f"r{i}"))
    crashed._db.close()  # the process died: no stop(), no drain
    sender = Sender()
    restarted = UsageOutbox(path, sender)
    assert restarted.depth() == 5
    restarted.start()
    assert await restarted.flushed(10)
    assert sorted(sender.delivered) == [f"r{i}" for i in range(5)]
    await restarted.stop()


async def test_stop_drains_what_it_can_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = UsageOutbox(path, Sender(up=False), min_backoff_s=0.01)
    box.start()
    await box.put(rec("kept"))
    await box.stop(drain_timeout_s=0.05)
    again = UsageOutbox(path, Sender())
    assert again.depth() == 1
    await again.stop()


async def test_a_cancelled_caller_still_gets_its_record_committed(tmp_path: Path) -> None:
    box = UsageOutbox(tmp_path / "outbox.db", Sender(up=False))
    task = asyncio.create_task(box.put(rec("c")))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await box.flushed(0.01) is False  # held, not sent
    assert box.depth() == 1
    await box.stop(drain_timeout_s=0)
