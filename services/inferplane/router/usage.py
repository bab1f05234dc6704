"""Usage records: what one request consumed, stored once (idempotent on its request id) and never lost.

``UsageRecorder.record_soon`` writes a record from a task of its own, so that a cancellation of the request
that produced it cannot interrupt the write; ``drain`` waits for those tasks at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from inferplane.router import metrics
from inferplane.router.clients import KeyInfo, MeteringClient
from inferplane.router.outbox import UsageOutbox
from inferplane.v1 import metering_pb2

log = logging.getLogger(__name__)


class UsageRecorder:
    def __init__(self, metering: MeteringClient, outbox: UsageOutbox | None = None) -> None:
        self._metering = metering
        self.outbox = outbox
        self._background: set[asyncio.Task[None]] = set()

    async def record(self, record: metering_pb2.UsageRecord, attempts: int = 5) -> None:
        """Store one usage record: durably in the outbox (which replays it to metering), or, without an
        outbox, sent with retries (idempotent on request id)."""
        if self.outbox is not None:
            try:
                await self.outbox.put(record)
                return
            except Exception:
                log.exception("usage outbox write failed for %s; sending directly", record.request_id)
        delay = 0.2
        for attempt in range(1, attempts + 1):
            try:
                await self._metering.record_usage(record, timeout=5.0)
                return
            except grpc.aio.AioRpcError as exc:
                if attempt == attempts or exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    metrics.USAGE_RECORDS_FAILED.inc()
                    log.error("usage record %s not stored after %d attempts: %s", record.request_id,
                              attempt, exc.code().name)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def record_soon(self, record: metering_pb2.UsageRecord) -> asyncio.Task[None]:
        """Start storing ``record`` in a task of its own (held until done; ``drain`` waits for it)."""
        task = asyncio.ensure_future(self.record(record))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self) -> None:
        """Wait for the records still being written (at shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def current_trace_id() -> str:
    """The current span's W3C trace id as 32 hex digits (sampled or not: the id exists either way), "" without one."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else ""


def usage_record(request_id: str, key: KeyInfo, model: str, prompt_tokens: int, completion_tokens: int,
                 finish_reason: str, started: float, first_token_at: float | None,
                 created_at: Timestamp) -> metering_pb2.UsageRecord:
    """``finish_reason`` is one of ``wire.FINISH_REASONS``; times are ``time.monotonic()`` readings."""
    record = metering_pb2.UsageRecord(
        request_id=request_id, key_id=key.key_id, model=model, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, finish_reason=finish_reason,
        latency_ms=int((time.monotonic() - started) * 1000), created_at=created_at)
    if first_token_at is not None:
        record.time_to_first_token_ms = int((first_token_at - started) * 1000)
    return record
