"""The router's durable outbox of usage records: nothing is lost while metering is down or restarting.

``put`` returns once the record is committed to a local SQLite file's write-ahead log (WAL,
``synchronous=NORMAL``): from then on it survives a crash of the router (the kernel holds the write); puts of one
turn of the event loop are committed together, in the loop's own thread (a WAL append is a write into the page
cache, ~70 µs; a hop to a worker thread and back cost more than the insert itself). The fsync that makes it survive
a crash of the machine too is a group commit off the requests' path: at most ``fsync_interval_s`` (1 s) after a
commit, one fsync of the WAL covers every record committed since the last one, and a checkpoint (on a connection of
its own, in a worker thread) then moves the WAL into the database file: the writer never checkpoints, so a commit
never waits for an fsync.
A replay task sends what the file holds in batches (``send_batch``, e.g. metering's RecordUsageBatch) and
deletes a batch only once it is acknowledged; a failed send is retried with exponential backoff and jitter.
A router that is killed replays its file when it starts again. Every step is idempotent on the request id
(the outbox keeps the first record of an id, metering's ledger too), so a batch sent twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import Counter, Gauge

from inferplane.router.clients import MeteringClient
from inferplane.v1 import metering_pb2

log = logging.getLogger(__name__)

SendBatch = Callable[[list[metering_pb2.UsageRecord]], Awaitable[None]]

OUTBOX_DEPTH = Gauge("inferplane_router_usage_outbox_depth", "Usage records not yet acknowledged by metering")
OUTBOX_SENT = Counter("inferplane_router_usage_outbox_sent", "Usage records acknowledged by metering")
OUTBOX_FAILURES = Counter("inferplane_router_usage_outbox_send_failures", "Failed batch sends (retried)")
OUTBOX_FSYNCS = Counter("inferplane_router_usage_outbox_fsyncs", "Group fsyncs of the outbox's write-ahead log")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    record BLOB NOT NULL,
    enqueued_at REAL NOT NULL
)
"""


class UsageOutbox:
    def __init__(self, path: Path, send_batch: SendBatch, *, batch_size: int = 500, min_backoff_s: float = 0.2,
                 max_backoff_s: float = 10.0, linger_s: float = 1.0, fsync_interval_s: float = 1.0) -> None:
        """``linger_s``: after a record arrives, how long the sender waits for more before sending a batch (fewer,
        larger RecordUsageBatch calls and outbox deletes; off the requests' path either way). ``fsync_interval_s``:
        the longest a committed record waits for the fsync that makes it survive a power loss."""
        assert batch_size >= 1, "batch_size must be positive"
        self.path = Path(path)
        self._send = send_batch
        self._batch_size = batch_size
        self._min_backoff = min_backoff_s
        self._max_backoff = max_backoff_s
        self._linger = linger_s
        self._fsync_interval = fsync_interval_s
        self._fsync: asyncio.Task[None] | None = None
        self.fsyncs = 0  # group fsyncs done (tests read it)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection for the records, used by the loop's thread (puts) and by worker threads (replay) one at a
        # time (the lock), never concurrently; checkpoints use a connection of their own (``_checkpoint``).
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db_lock = threading.Lock()
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpoint_lock = threading.Lock()  # a checkpoint still running in its thread vs. stop's close
        self._closed = False
        with self._db_lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives our crash; fsync below
            self._db.execute("PRAGMA wal_autocheckpoint=0")  # a commit in the loop never checkpoints (fsyncs)
            self._db.execute(_SCHEMA)
            self._depth = int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])
        OUTBOX_DEPTH.set(self._depth)
        self._empty = asyncio.Event()  # set while nothing is held
        if not self._depth:
            self._empty.set()
        self._pending: list[tuple[metering_pb2.UsageRecord, asyncio.Future[None]]] = []
        self._commit_soon: asyncio.Handle | None = None
        self._wake = asyncio.Event()
        self._replay: asyncio.Task[None] | None = None

    def depth(self) -> int:
        """Records held and not yet acknowledged."""
        return self._depth

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        OUTBOX_DEPTH.set(depth)
        if depth:
            self._empty.clear()
        else:
            self._empty.set()

    # -- put: group commit --

    async def put(self, record: metering_pb2.UsageRecord) -> None:
        """Store ``record`` durably (committed before this returns); a request id already held is kept as is."""
        assert record.request_id, "a usage record needs its request id"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((record, future))
        if self._commit_soon is None:  # the puts of this turn of the loop commit together, at its end
            self._commit_soon = loop.call_soon(self._commit_pending)
        await asyncio.shield(future)  # a cancelled caller still gets its record committed

    def _commit_pending(self) -> None:
        """Commit what ``put`` holds (in the loop's thread: no await, nothing to interrupt)."""
        self._commit_soon = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            added = self._insert([r for r, _ in batch])
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self._set_depth(self._depth + added)
        for _, future in batch:
            if not future.done():
                future.set_result(None)
        self._wake.set()
        if self._fsync is None or self._fsync.done():
            self._fsync = asyncio.create_task(self._fsync_soon(), name="usage-outbox-fsync")

    def _commit_now(self) -> None:
        """Commit what waits for the end of this turn of the loop now (stop, flushed)."""
        if self._commit_soon is not None:
            self._commit_soon.cancel()
            self._commit_pending()

    async def synced(self) -> None:
        """Wait for the pending group fsync, if any (tests; shutdown does its own)."""
        if self._fsync is not None:
            await asyncio.shield(self._fsync)

    async def _fsync_soon(self) -> None:
        """One fsync of the WAL for every commit of the last ``fsync_interval_s`` (a group commit), then a
        checkpoint."""
        await asyncio.sleep(self._fsync_interval)
        await asyncio.to_thread(self._fsync_wal)
        await asyncio.to_thread(self._checkpoint)

    def _fsync_wal(self) -> None:
        """fsync the WAL file (no lock: the file, not the connection; our connection keeps it in place)."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:  # checkpointed and removed: SQLite fsynced it then
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.fsyncs += 1
        OUTBOX_FSYNCS.inc()

    def _checkpoint(self) -> None:
        """Move the WAL's frames into the database (PASSIVE: never blocks the writer); the writer then starts the
        WAL over instead of growing it. In a worker thread, on its own connection."""
        with self._checkpoint_lock:
            if self._closed:
                return
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                self._checkpointer.execute("PRAGMA synchronous=NORMAL")
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _close_checkpointer(self) -> None:
        with self._checkpoint_lock:
            self._closed = True
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None

    def _insert(self, records: list[metering_pb2.UsageRecord]) -> int:
        now = time.time()
        with self._db_lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO outbox (request_id, record, enqueued_at) VALUES (?, ?, ?)",
                    [(r.request_id, r.SerializeToString(), now) for r in records])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._db.total_changes - before

    # -- replay --

    def start(self) -> None:
        """Start sending (what an earlier run left in the file goes first)."""
        if self._replay is None or self._replay.done():
            self._wake.set()
            self._replay = asyncio.create_task(self._replay_forever(), name="usage-outbox-replay")

    async def stop(self, *, drain_timeout_s: float = 5.0) -> None:
        """Try for ``drain_timeout_s`` to send what is held, then stop; whatever is left stays in the file."""
        self._commit_now()
        if self._fsync is not None and not self._fsync.done():
            self._fsync.cancel()
            await asyncio.gather(self._fsync, return_exceptions=True)
            await asyncio.to_thread(self._fsync_wal)  # what was committed is on disk before we go
        if self._replay is not None and not self._replay.done():
            if self._depth:
                self._wake.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._empty.wait(), drain_timeout_s)
            self._replay.cancel()
            await asyncio.gather(self._replay, return_exceptions=True)
        with self._db_lock:
            self._db.close()
        await asyncio.to_thread(self._close_checkpointer)

    async def flushed(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything held has been acknowledged (for tests and shutdown); False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                self._commit_now()
                await self._empty.wait()
        except TimeoutError:
            return False
        return True

    async def _replay_forever(self) -> None:
        backoff = self._min_backoff
        while True:
            await self._wake.wait()
            if self._linger > 0:
                await asyncio.sleep(self._linger)
            self._wake.clear()
            while True:
                rows = await asyncio.to_thread(self._oldest, self._batch_size)
                if not rows:
                    break
                records = [metering_pb2.UsageRecord.FromString(blob) for _, blob in rows]
                try:
                    await self._send(records)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    OUTBOX_FAILURES.inc()
                    delay = backoff * random.uniform(0.5, 1.0)
                    log.warning("usage outbox: %d records not acknowledged (%s); retrying in %.2fs (%d held)",
                                len(records), type(exc).__name__, delay, self._depth)
                    await asyncio.sleep(delay)
                    backoff = min(backoff * 2, self._max_backoff)
                    continue
                backoff = self._min_backoff
                removed = await asyncio.to_thread(self._delete_through, rows[-1][0])
                self._set_depth(self._depth - removed)
                OUTBOX_SENT.inc(len(records))

    def _oldest(self, limit: int) -> list[tuple[int, bytes]]:
        with self._db_lock:
            return [(int(seq), bytes(blob)) for seq, blob in
                    self._db.execute("SELECT seq, record FROM outbox ORDER BY seq LIMIT ?", (limit,))]

    def _delete_through(self, last_seq: int) -> int:
        """Delete the batch just acknowledged: the oldest rows, through ``last_seq`` (one range delete, so the lock a
        put on the event loop may wait for is held briefly; later puts have higher sequence numbers)."""
        with self._db_lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM outbox WHERE seq <= ?", (last_seq,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._db.total_changes - before


def batch_sender(metering: MeteringClient, *, timeout_s: float = 10.0) -> SendBatch:
    """``send_batch`` over metering's RecordUsageBatch. A transport error raises (the outbox retries); a record
    metering calls INVALID can never be stored, so it is logged and acknowledged rather than retried forever."""

    async def send(records: list[metering_pb2.UsageRecord]) -> None:
        reply = await metering.record_usage_batch(records, timeout=timeout_s)
        for record, outcome, error in zip(records, reply.outcomes, reply.errors, strict=False):
            if outcome == metering_pb2.RECORD_OUTCOME_INVALID:
                log.error("usage record %s refused by metering as invalid: %s", record.request_id, error)

    return send
