"""The ``Tokenizer`` interface as a client of the tokenizer service (``Encode``, ``EncodeBatch``, ``DecodeStream``).

The service's refusals come back as the domain errors the local implementation raises (``InvalidArgument``,
``NotFound``, with their ``param``), so a caller sees the same exception whichever implementation it holds;
other statuses (UNAVAILABLE, DEADLINE_EXCEEDED) propagate as ``grpc.aio.AioRpcError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import NoReturn, cast

import grpc

from inferplane.common.errors import PARAM_METADATA_KEY, InferplaneError, InvalidArgument, NotFound, Unavailable
from inferplane.common.wire import metadata_value
from inferplane.tokenization.api import Encoded
from inferplane.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

# The statuses the tokenizer service answers a bad request with, back to the exceptions it raised.
_DOMAIN_ERRORS: dict[grpc.StatusCode, type[InferplaneError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
}


def raise_domain_error(exc: grpc.aio.AioRpcError) -> NoReturn:
    """Raise the domain error a tokenizer status stands for (its ``param`` from the trailers), else ``exc``."""
    cls = _DOMAIN_ERRORS.get(exc.code())
    if cls is None:
        raise exc
    # grpc.aio's trailers iterate as (key, value) pairs; grpc-stubs types them as the sync API's objects.
    trailers = cast("Iterable[tuple[str, str | bytes]]", exc.trailing_metadata() or ())
    param = metadata_value(trailers, PARAM_METADATA_KEY)
    if isinstance(param, bytes):
        param = param.decode(errors="replace")
    raise cls(exc.details() or exc.code().name, param=param) from exc


class GrpcTokenizer:
    """``Tokenizer`` over a channel to the tokenizer service."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        self._token_bytes: dict[str, dict[int, bytes]] = {}  # model -> id -> its decoded text

    async def encode_text(self, model: str, text: str, *, timeout: float | None) -> Encoded:
        return await self._encode(tokenizer_pb2.EncodeRequest(model=model, text=text), timeout)

    async def encode_chat(self, model: str, messages: Sequence[common_pb2.ChatMessage], *,
                          timeout: float | None) -> Encoded:
        chat = tokenizer_pb2.ChatMessages(messages=messages)
        return await self._encode(tokenizer_pb2.EncodeRequest(model=model, chat=chat), timeout)

    async def _encode(self, req: tokenizer_pb2.EncodeRequest, timeout: float | None) -> Encoded:
        try:
            resp = await self._stub.Encode(req, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise_domain_error(exc)
        return Encoded(list(resp.token_ids), list(resp.stop_token_ids))

    async def encode_batch(self, model: str, texts: Sequence[str], *, add_special_tokens: bool,
                           timeout: float | None) -> list[list[int]]:
        req = tokenizer_pb2.EncodeBatchRequest(model=model, texts=texts, add_special_tokens=add_special_tokens)
        try:
            resp = await self._stub.EncodeBatch(req, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise_domain_error(exc)
        return [list(e.ids) for e in resp.encodings]

    async def token_bytes(self, model: str, token_ids: Sequence[int], *, timeout: float | None) -> list[bytes]:
        """Each id decoded on its own (one Decode per id not seen before; a vocabulary is finite, so the cache is
        bounded by it)."""
        cache = self._token_bytes.setdefault(model, {})
        for token_id in dict.fromkeys(token_ids):
            if token_id not in cache:
                cache[token_id] = (await self.decode(model, [token_id], timeout=timeout)).encode()
        return [cache[t] for t in token_ids]

    def decoder(self, model: str, *, timeout: float | None) -> StreamingDecoder:
        return StreamingDecoder(self._stub.DecodeStream(timeout=timeout), model)

    async def decode(self, model: str, token_ids: Sequence[int], *, timeout: float | None) -> str:
        req = tokenizer_pb2.DecodeRequest(model=model, token_ids=token_ids, skip_special_tokens=False)
        try:
            resp = await self._stub.Decode(req, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise_domain_error(exc)
        return str(resp.text)


class StreamingDecoder:
    """One DecodeStream call: write new ids, read back the text they completed (lock-step)."""

    def __init__(self, call: grpc.aio.StreamStreamCall, model: str) -> None:
        self._call = call
        self._model: str | None = model

    async def push(self, token_ids: list[int], *, final: bool = False) -> str:
        req = tokenizer_pb2.DecodeStreamRequest(token_ids=token_ids, final=final)
        if self._model is not None:
            req.model, self._model = self._model, None
        try:
            await self._call.write(req)
            resp = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise_domain_error(exc)
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
