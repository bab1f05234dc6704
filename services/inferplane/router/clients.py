"""The router's clients of executor and metering: protobuf in, plain Python out.

Tokenization (in process or through the tokenizer service) is ``inferplane.tokenization``'s ``Tokenizer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import grpc

from inferplane.v1 import executor_pb2, executor_pb2_grpc, metering_pb2, metering_pb2_grpc


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What metering's VerifyKey says about a key: its tenant, what it may use, its limits."""

    key_id: str
    name: str
    tenant_id: str = "default"
    # Public model ids the key may use; empty: every model.
    models: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset({"inference"})
    # None: unlimited.
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    # The key or its tenant has a budget: admission reserves with metering before work.
    has_budget: bool = False
    # Unix seconds when the key stops working; None: never.
    expires_at: float | None = None

    def may_use(self, model_id: str) -> bool:
        return not self.models or model_id in self.models

    @classmethod
    def from_pb(cls, resp: metering_pb2.VerifyKeyResponse) -> KeyInfo:
        return cls(resp.key_id, resp.name, tenant_id=resp.tenant_id or "default", models=frozenset(resp.models),
                   scopes=frozenset(resp.scopes),
                   requests_per_minute=resp.requests_per_minute if resp.HasField("requests_per_minute") else None,
                   tokens_per_minute=resp.tokens_per_minute if resp.HasField("tokens_per_minute") else None,
                   has_budget=resp.has_budget,
                   expires_at=resp.expires_at.ToMicroseconds() / 1e6 if resp.HasField("expires_at") else None)


async def embed_on(stub: executor_pb2_grpc.ExecutorServiceStub, model: str, inputs: list[list[int]], *,
                   request_id: str, timeout: float | None) -> list[list[float]]:
    req = executor_pb2.ExecutorEmbedRequest(model=model, request_id=request_id, inputs=[
        executor_pb2.EmbedInput(token_ids=ids) for ids in inputs])
    resp = await stub.Embed(req, timeout=timeout)
    return [list(e.values) for e in resp.embeddings]


class MeteringClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = metering_pb2_grpc.MeteringServiceStub(channel)

    async def verify_key(self, api_key: str, *, timeout: float) -> KeyInfo:
        resp = await self._stub.VerifyKey(metering_pb2.VerifyKeyRequest(api_key=api_key), timeout=timeout)
        return KeyInfo.from_pb(resp)

    async def record_usage(self, record: metering_pb2.UsageRecord, *, timeout: float) -> bool:
        resp = await self._stub.RecordUsage(metering_pb2.RecordUsageRequest(record=record), timeout=timeout)
        return bool(resp.created)

    async def record_usage_batch(self, records: list[metering_pb2.UsageRecord], *,
                                 timeout: float = 10.0) -> metering_pb2.RecordUsageBatchResponse:
        """One transaction in metering; one outcome per record (INVALID ones can never be stored)."""
        return await self._stub.RecordUsageBatch(metering_pb2.RecordUsageBatchRequest(records=records),
                                                 timeout=timeout)

    async def reserve(self, *, reservation_id: str, key_id: str, model: str, prompt_tokens: int, max_tokens: int,
                      multiplier: Decimal | None = None, timeout: float = 5.0) -> metering_pb2.ReserveResponse:
        """Hold the worst-case cost on the key's and tenant's budgets (at a service tier's ``multiplier``);
        RESOURCE_EXHAUSTED when it would overspend."""
        req = metering_pb2.ReserveRequest(reservation_id=reservation_id, key_id=key_id, model=model,
                                          prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                                          tier_multiplier="" if multiplier in (None, 1) else str(multiplier))
        return await self._stub.Reserve(req, timeout=timeout)

    async def release(self, reservation_id: str, *, timeout: float = 5.0) -> bool:
        resp = await self._stub.Release(metering_pb2.ReleaseRequest(reservation_id=reservation_id), timeout=timeout)
        return bool(resp.released)

    async def list_prices(self, *, timeout: float = 5.0) -> list[metering_pb2.Price]:
        resp = await self._stub.ListPrices(metering_pb2.ListPricesRequest(), timeout=timeout)
        return list(resp.prices)

    async def list_catalog(self, *, if_newer_than: int = 0, timeout: float = 5.0) -> metering_pb2.ListCatalogResponse:
        """Metering's catalog with its version (``unchanged`` and no models when not above ``if_newer_than``)."""
        return await self._stub.ListCatalog(metering_pb2.ListCatalogRequest(if_newer_than=if_newer_than),
                                            timeout=timeout)
