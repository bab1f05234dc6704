"""The router's clients of tokenizer, executor and metering: protobuf in, plain Python out."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc

from inferplane.common.errors import Unavailable
from inferplane.tokenizer.bundle import TokenizerBundle
from inferplane.tokenizer.detok import IncrementalDecoder
from inferplane.tokenizer.service import message_dicts
from inferplane.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    metering_pb2,
    metering_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)


@dataclass(frozen=True, slots=True)
class Encoded:
    token_ids: list[int]
    stop_token_ids: list[int]


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


class TokenizerClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)

    async def encode_text(self, model: str, text: str, *, timeout: float | None) -> Encoded:
        resp = await self._stub.Encode(tokenizer_pb2.EncodeRequest(model=model, text=text), timeout=timeout)
        return Encoded(list(resp.token_ids), list(resp.stop_token_ids))

    async def encode_chat(self, model: str, messages: list[common_pb2.ChatMessage], *,
                          timeout: float | None) -> Encoded:
        req = tokenizer_pb2.EncodeRequest(model=model, chat=tokenizer_pb2.ChatMessages(messages=messages))
        resp = await self._stub.Encode(req, timeout=timeout)
        return Encoded(list(resp.token_ids), list(resp.stop_token_ids))

    async def encode_batch(self, model: str, texts: list[str], *, add_special_tokens: bool,
                           timeout: float | None) -> list[list[int]]:
        req = tokenizer_pb2.EncodeBatchRequest(model=model, texts=texts, add_special_tokens=add_special_tokens)
        resp = await self._stub.EncodeBatch(req, timeout=timeout)
        return [list(e.ids) for e in resp.encodings]

    def decoder(self, model: str, *, timeout: float | None) -> StreamingDecoder:
        return StreamingDecoder(self._stub.DecodeStream(timeout=timeout), model)


class StreamingDecoder:
    """One DecodeStream call: write new ids, read back the text they completed (lock-step)."""

    def __init__(self, call: grpc.aio.StreamStreamCall, model: str) -> None:
        self._call = call
        self._model: str | None = model

    async def push(self, token_ids: list[int], *, final: bool = False) -> str:
        req = tokenizer_pb2.DecodeStreamRequest(token_ids=token_ids, final=final)
        if self._model is not None:
            req.model, self._model = self._model, None
        await self._call.write(req)
        resp = await self._call.read()
        if resp is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise Unavailable("tokenizer closed the decode stream")
        assert isinstance(resp, tokenizer_pb2.DecodeStreamResponse)
        return resp.text

    async def close(self) -> None:
        """Half-close and read to the end (the tokenizer ends the stream), so the client span ends too."""
        try:
            if not self._call.done():
                await self._call.done_writing()
            async with asyncio.timeout(2.0):
                while await self._call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                    pass
        except (TimeoutError, grpc.aio.AioRpcError, grpc.aio.UsageError):
            self._call.cancel()


class LocalDecoder:
    """In-process incremental detokenization with the same code the tokenizer service runs.

    Saves the round trip to the tokenizer for every executor message (two messages and their
    (de)serialisation on each side); the router then needs the tokenizer files of its catalog.
    """

    def __init__(self, decoder: IncrementalDecoder) -> None:
        self._decoder = decoder

    async def push(self, token_ids: list[int], *, final: bool = False) -> str:
        text = self._decoder.push(token_ids) if token_ids else ""
        return text + self._decoder.flush() if final else text

    async def close(self) -> None:
        return None


class LocalTokenizers:
    """Tokenizer bundles the router loads itself (lazily, once per model): ``LocalDecoder`` for streamed text,
    and the ``TokenizerClient`` calls (``encode_text``, ``encode_chat``, ``encode_batch``) in process, with the
    tokenizer service's own code and files, so a request makes no round trip to the tokenizer at all."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self._paths = paths
        self._bundles: dict[str, TokenizerBundle] = {}

    def bundle(self, model: str) -> TokenizerBundle:
        bundle = self._bundles.get(model)
        if bundle is None:
            bundle = self._bundles[model] = TokenizerBundle.from_dir(self._paths[model], name=model)
        return bundle

    def decoder(self, model: str) -> LocalDecoder:
        return LocalDecoder(IncrementalDecoder(self.bundle(model), skip_special_tokens=True))

    async def encode_text(self, model: str, text: str, *, timeout: float | None) -> Encoded:
        bundle = self.bundle(model)
        return Encoded(bundle.encode(text), list(bundle.stop_token_ids))

    async def encode_chat(self, model: str, messages: list[common_pb2.ChatMessage], *,
                          timeout: float | None) -> Encoded:
        bundle = self.bundle(model)
        return Encoded(bundle.encode_chat(message_dicts(messages))[0], list(bundle.stop_token_ids))

    async def encode_batch(self, model: str, texts: list[str], *, add_special_tokens: bool,
                           timeout: float | None) -> list[list[int]]:
        return self.bundle(model).encode_batch(texts, add_special_tokens=add_special_tokens)


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
                      timeout: float = 5.0) -> metering_pb2.ReserveResponse:
        """Hold the worst-case cost on the key's and tenant's budgets; RESOURCE_EXHAUSTED when it would overspend."""
        req = metering_pb2.ReserveRequest(reservation_id=reservation_id, key_id=key_id, model=model,
                                          prompt_tokens=prompt_tokens, max_tokens=max_tokens)
        return await self._stub.Reserve(req, timeout=timeout)

    async def release(self, reservation_id: str, *, timeout: float = 5.0) -> bool:
        resp = await self._stub.Release(metering_pb2.ReleaseRequest(reservation_id=reservation_id), timeout=timeout)
        return bool(resp.released)

    async def list_prices(self, *, timeout: float = 5.0) -> list[metering_pb2.Price]:
        resp = await self._stub.ListPrices(metering_pb2.ListPricesRequest(), timeout=timeout)
        return list(resp.prices)
