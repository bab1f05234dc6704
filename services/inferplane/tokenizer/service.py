"""The TokenizerService gRPC edge: protobuf in, a call on the local tokenization library, protobuf out.

The work is ``inferplane.tokenization``'s (a ``TokenizerRegistry`` of bundles, ``IncrementalDecoder``): the
router runs the same code in process unless its settings send it here.

A model this service does not know may be one metering's catalog has just added (the router polls the catalog on
its own clock and may know it first): with ``refresh`` (the catalog watcher's ``poll_once``), an unknown model makes
it poll metering at once (one poll at a time, at most one every ``REFRESH_MIN_S``) before it answers NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from inferplane.common.errors import InvalidArgument, NotFound
from inferplane.tokenization.detok import IncrementalDecoder
from inferplane.tokenization.local import TokenizerBundle, TokenizerRegistry, message_dicts
from inferplane.v1 import tokenizer_pb2, tokenizer_pb2_grpc

REFRESH_MIN_S = 0.5


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, registry: TokenizerRegistry, refresh: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.registry = registry
        self._refresh = refresh
        self._refreshing: asyncio.Future[bool] | None = None
        self._refreshed_at = -REFRESH_MIN_S

    async def _bundle(self, model: str) -> TokenizerBundle:
        try:
            return self.registry.get(model)
        except NotFound:
            if self._refresh is None:
                raise
        await self._catalog_now()
        return self.registry.get(model)

    async def _catalog_now(self) -> None:
        """Poll metering's catalog now (single-flight, at most one poll every REFRESH_MIN_S)."""
        if (self._refreshing is None or self._refreshing.done()) and \
                time.monotonic() - self._refreshed_at >= REFRESH_MIN_S:
            assert self._refresh is not None
            self._refreshed_at = time.monotonic()
            self._refreshing = asyncio.ensure_future(self._refresh())
        if self._refreshing is not None:
            try:
                await asyncio.shield(self._refreshing)
            except grpc.aio.AioRpcError:
                pass  # metering unreachable: what is not known here stays unknown

    async def Encode(self, request: tokenizer_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> tokenizer_pb2.EncodeResponse:
        bundle = await self._bundle(request.model)
        which = request.WhichOneof("input")
        if which == "chat":
            ids, rendered = bundle.encode_chat(message_dicts(request.chat.messages))
        elif which == "text":
            ids, rendered = bundle.encode(request.text, add_special_tokens=request.add_special_tokens), request.text
        else:
            raise InvalidArgument("EncodeRequest needs text or chat", param="input")
        return tokenizer_pb2.EncodeResponse(token_ids=ids, rendered=rendered, stop_token_ids=bundle.stop_token_ids)

    async def EncodeBatch(self, request: tokenizer_pb2.EncodeBatchRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> tokenizer_pb2.EncodeBatchResponse:
        bundle = await self._bundle(request.model)
        encoded = bundle.encode_batch(list(request.texts), add_special_tokens=request.add_special_tokens)
        return tokenizer_pb2.EncodeBatchResponse(encodings=[tokenizer_pb2.TokenIds(ids=ids) for ids in encoded])

    async def Decode(self, request: tokenizer_pb2.DecodeRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> tokenizer_pb2.DecodeResponse:
        bundle = await self._bundle(request.model)
        text = bundle.decode(list(request.token_ids), skip_special_tokens=request.skip_special_tokens)
        return tokenizer_pb2.DecodeResponse(text=text)

    async def DecodeStream(self, request_iterator: AsyncIterator[tokenizer_pb2.DecodeStreamRequest],
                           context: grpc.aio.ServicerContext[Any, Any],
                           ) -> AsyncIterator[tokenizer_pb2.DecodeStreamResponse]:
        # The request has no skip_special_tokens field: streamed text is for people, so specials are dropped.
        decoder: IncrementalDecoder | None = None
        async for request in request_iterator:
            if decoder is None:
                decoder = IncrementalDecoder(await self._bundle(request.model), skip_special_tokens=True)
            text = decoder.push(request.token_ids)
            if request.final:
                yield tokenizer_pb2.DecodeStreamResponse(text=text + decoder.flush())
                return
            yield tokenizer_pb2.DecodeStreamResponse(text=text)
        if decoder is not None and (rest := decoder.flush()):
            yield tokenizer_pb2.DecodeStreamResponse(text=rest)  # the client half-closed without final
