"""The metering gRPC servicer: protobuf in, plain store call (in a thread), protobuf out."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc
from prometheus_client import Counter, Histogram

from inferplane.v1 import metering_pb2, metering_pb2_grpc
from services.common.errors import InvalidArgument
from services.metering.store import DEFAULT_USAGE_LIMIT, MeteringStore, UsageRow


def usage_from_pb(pb: metering_pb2.UsageRecord) -> UsageRow:
    """A ``UsageRow`` from the wire; ``InvalidArgument`` on bad values (checked by ``UsageRow``)."""
    created_at = pb.created_at.ToDatetime(tzinfo=UTC) if pb.HasField("created_at") else datetime.now(UTC)
    return UsageRow(
        request_id=pb.request_id, key_id=pb.key_id, model=pb.model, prompt_tokens=pb.prompt_tokens,
        completion_tokens=pb.completion_tokens, finish_reason=pb.finish_reason, latency_ms=pb.latency_ms,
        created_at=created_at,
        time_to_first_token_ms=pb.time_to_first_token_ms if pb.HasField("time_to_first_token_ms") else None,
    )


def usage_to_pb(row: UsageRow) -> metering_pb2.UsageRecord:
    pb = metering_pb2.UsageRecord(
        request_id=row.request_id, key_id=row.key_id, model=row.model, prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens, finish_reason=row.finish_reason, latency_ms=row.latency_ms,
        time_to_first_token_ms=row.time_to_first_token_ms,
    )
    pb.created_at.FromDatetime(row.created_at)
    return pb


RECORDS = Counter("inferplane_metering_usage_records", "RecordUsage calls, by result (created/duplicate)",
                  ["result"])
INGEST_LAG = Histogram("inferplane_metering_ingest_lag_seconds",
                       "From request acceptance (the record's created_at) to the ledger write",
                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600))


class MeteringServicer(metering_pb2_grpc.MeteringServiceServicer):
    """``inferplane.v1.MeteringService`` over a ``MeteringStore``."""

    def __init__(self, store: MeteringStore) -> None:
        self._store = store

    async def VerifyKey(self, request: metering_pb2.VerifyKeyRequest,
                        context: grpc.aio.ServicerContext) -> metering_pb2.VerifyKeyResponse:
        info = await asyncio.to_thread(self._store.verify_key, request.api_key)
        return metering_pb2.VerifyKeyResponse(key_id=info.key_id, name=info.name)

    async def RecordUsage(self, request: metering_pb2.RecordUsageRequest,
                          context: grpc.aio.ServicerContext) -> metering_pb2.RecordUsageResponse:
        if not request.HasField("record"):
            raise InvalidArgument("record is required", param="record")
        row = usage_from_pb(request.record)
        created = await asyncio.to_thread(self._store.record_usage, row)
        RECORDS.labels("created" if created else "duplicate").inc()
        if created:
            INGEST_LAG.observe(max(0.0, (datetime.now(UTC) - row.created_at).total_seconds()))
        return metering_pb2.RecordUsageResponse(created=created)

    async def ListUsage(self, request: metering_pb2.ListUsageRequest,
                        context: grpc.aio.ServicerContext) -> metering_pb2.ListUsageResponse:
        key_id = request.key_id if request.HasField("key_id") else None
        limit = request.limit or DEFAULT_USAGE_LIMIT  # the store refuses negative and over-large limits
        rows = await asyncio.to_thread(self._store.list_usage, key_id, limit)
        return metering_pb2.ListUsageResponse(records=[usage_to_pb(r) for r in rows])
