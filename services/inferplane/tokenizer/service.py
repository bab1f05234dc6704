"""The TokenizerService gRPC edge: protobuf in, a ``TokenizerBundle`` / ``IncrementalDecoder`` call, protobuf out."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc

from inferplane.common.catalog import Catalog, load_catalog
from inferplane.common.errors import InvalidArgument, NotFound
from inferplane.tokenizer.bundle import TokenizerBundle
from inferplane.tokenizer.detok import IncrementalDecoder
from inferplane.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

log = logging.getLogger(__name__)


class TokenizerRegistry:
    """Model id → loaded tokenizer. Built eagerly, so a bad tokenizer folder fails at start, not on a request."""

    def __init__(self, bundles: dict[str, TokenizerBundle]) -> None:
        self._bundles = dict(bundles)

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> TokenizerRegistry:
        bundles: dict[str, TokenizerBundle] = {}
        for model in catalog.models:
            start = time.perf_counter()
            bundle = TokenizerBundle.from_dir(model.tokenizer, name=model.id)
            bundles[model.id] = bundle
            log.info("loaded tokenizer %s from %s: vocab %d, chat template %s, stop ids %s (%.0f ms)",
                     model.id, model.tokenizer, bundle.vocab_size, "yes" if bundle.chat_template else "no",
                     bundle.stop_token_ids, (time.perf_counter() - start) * 1000)
        return cls(bundles)

    @classmethod
    def from_catalog_file(cls, path: Path) -> TokenizerRegistry:
        return cls.from_catalog(load_catalog(path))

    @property
    def model_ids(self) -> list[str]:
        return list(self._bundles)

    def get(self, model_id: str) -> TokenizerBundle:
        if not model_id:
            raise InvalidArgument("model is required", param="model")
        bundle = self._bundles.get(model_id)
        if bundle is None:
            raise NotFound(f"model {model_id!r} has no tokenizer here (known: {', '.join(self._bundles)})",
                           param="model")
        return bundle


def messages_from_pb(chat: tokenizer_pb2.ChatMessages) -> list[dict[str, Any]]:
    """ChatMessage protos as the plain dicts a chat template reads (``name`` only when set)."""
    return message_dicts(chat.messages)


def message_dicts(messages: Iterable[common_pb2.ChatMessage]) -> list[dict[str, Any]]:
    return [_message_from_pb(m) for m in messages]


def _message_from_pb(message: common_pb2.ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.HasField("name"):
        out["name"] = message.name
    return out


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, registry: TokenizerRegistry) -> None:
        self.registry = registry

    async def Encode(self, request: tokenizer_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> tokenizer_pb2.EncodeResponse:
        bundle = self.registry.get(request.model)
        which = request.WhichOneof("input")
        if which == "chat":
            ids, rendered = bundle.encode_chat(messages_from_pb(request.chat))
        elif which == "text":
            ids, rendered = bundle.encode(request.text, add_special_tokens=request.add_special_tokens), request.text
        else:
            raise InvalidArgument("EncodeRequest needs text or chat", param="input")
        return tokenizer_pb2.EncodeResponse(token_ids=ids, rendered=rendered, stop_token_ids=bundle.stop_token_ids)

    async def EncodeBatch(self, request: tokenizer_pb2.EncodeBatchRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> tokenizer_pb2.EncodeBatchResponse:
        bundle = self.registry.get(request.model)
        encoded = bundle.encode_batch(list(request.texts), add_special_tokens=request.add_special_tokens)
        return tokenizer_pb2.EncodeBatchResponse(encodings=[tokenizer_pb2.TokenIds(ids=ids) for ids in encoded])

    async def Decode(self, request: tokenizer_pb2.DecodeRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> tokenizer_pb2.DecodeResponse:
        bundle = self.registry.get(request.model)
        text = bundle.decode(list(request.token_ids), skip_special_tokens=request.skip_special_tokens)
        return tokenizer_pb2.DecodeResponse(text=text)

    async def DecodeStream(self, request_iterator: AsyncIterator[tokenizer_pb2.DecodeStreamRequest],
                           context: grpc.aio.ServicerContext[Any, Any],
                           ) -> AsyncIterator[tokenizer_pb2.DecodeStreamResponse]:
        # The request has no skip_special_tokens field: streamed text is for people, so specials are dropped.
        decoder: IncrementalDecoder | None = None
        async for request in request_iterator:
            if decoder is None:
                decoder = IncrementalDecoder(self.registry.get(request.model), skip_special_tokens=True)
            text = decoder.push(request.token_ids)
            if request.final:
                yield tokenizer_pb2.DecodeStreamResponse(text=text + decoder.flush())
                return
            yield tokenizer_pb2.DecodeStreamResponse(text=text)
        if decoder is not None and (rest := decoder.flush()):
            yield tokenizer_pb2.DecodeStreamResponse(text=rest)  # the client half-closed without final
