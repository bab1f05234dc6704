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


CRASHING_ROUTER = """
import asyncio, sys
from pathlib import Path
from inferplane.router.outbox import UsageOutbox
from inferplane.v1 import metering_pb2

async def never(records):
    raise ConnectionError("metering is down")

async def main():
    box = UsageOutbox(Path(sys.argv[1]), never, fsync_interval_s=3600)  # no fsync before the kill
    for i in range(200):
        await box.put(metering_pb2.UsageRecord(request_id=f"r{i}"))
    print("committed", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_a_put_that_returned_survives_a_sigkill_of_the_process(tmp_path: Path) -> None:
    """``put`` returns at the WAL commit, before any fsync: a router SIGKILLed right after still has every record."""
    import signal
    import sqlite3
    import subprocess
    import sys

    path = tmp_path / "outbox.db"
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_ROUTER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "committed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with sqlite3.connect(path) as db:
        ids = {row[0] for row in db.execute("SELECT request_id FROM outbox")}
    assert ids == {f"r{i}" for i in range(200)}


async def test_commits_are_fsynced_together_within_the_interval(tmp_path: Path) -> None:
    box = UsageOutbox(tmp_path / "outbox.db", Sender(up=False), fsync_interval_s=0.2)
    await asyncio.gather(*(box.put(rec(f"r{i}")) for i in range(50)))
    assert box.fsyncs == 0  # the puts did not wait for it
    await asyncio.wait_for(box.synced(), 30)
    assert 1 <= box.fsyncs < 50  # one fsync covers many commits (a group commit)
    await box.stop(drain_timeout_s=0)


async def test_the_writer_never_checkpoints_the_group_fsync_does(tmp_path: Path) -> None:
    """Commits in the event loop only append to the WAL (no checkpoint, so no fsync on the loop); the group fsync's
    checkpoint, in a worker thread on its own connection, moves the records into the database file."""
    path = tmp_path / "outbox.db"
    box = UsageOutbox(path, Sender(up=False), fsync_interval_s=0.2)
    blob = "x" * 400
    # ~6 MB in one commit: past SQLite's automatic checkpoint (1,000 pages), which the writer would run at commit
    await asyncio.gather(*(box.put(metering_pb2.UsageRecord(request_id=f"r{i}", model=blob)) for i in range(12_000)))
    before = path.stat().st_size
    assert before < 64 * 1024, before  # the records are in the WAL only
    await asyncio.wait_for(box.synced(), 30)
    assert path.stat().st_size > 4 * 2**20  # checkpointed into the database file
    assert box.depth() == 12_000
    await box.stop(drain_timeout_s=0)


async def test_records_put_while_a_batch_is_sent_stay_for_the_next_batch(tmp_path: Path) -> None:
    """The acknowledged batch is deleted by sequence range: what arrived during its send is kept and sent next."""
    release, first = asyncio.Event(), asyncio.Event()
    sent: list[list[str]] = []

    async def slow(records: list[metering_pb2.UsageRecord]) -> None:
        sent.append([r.request_id for r in records])
        if len(sent) == 1:
            first.set()
            await release.wait()

    box = UsageOutbox(tmp_path / "outbox.db", slow, linger_s=0)
    box.start()
    await asyncio.gather(*(box.put(rec(f"a{i}")) for i in range(5)))
    await asyncio.wait_for(first.wait(), 10)
    await asyncio.gather(*(box.put(rec(f"b{i}")) for i in range(3)))  # while the first batch is in flight
    release.set()
    assert await box.flushed(10)
    assert sent[0] == [f"a{i}" for i in range(5)]
    assert sorted(r for batch in sent[1:] for r in batch) == [f"b{i}" for i in range(3)]
    await box.stop(drain_timeout_s=0)
