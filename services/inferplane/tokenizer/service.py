"""The TokenizerService gRPC edge: protobuf in, a call on the local tokenization library, protobuf out.

The work is ``inferplane.tokenization``'s (a ``TokenizerRegistry`` of bundles, ``IncrementalDecoder``): the
router runs the same code in process unless its settings send it here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from inferplane.common.errors import InvalidArgument
from inferplane.tokenization.detok import IncrementalDecoder
from inferplane.tokenization.local import TokenizerRegistry, message_dicts
from inferplane.v1 import tokenizer_pb2, tokenizer_pb2_grpc


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, registry: TokenizerRegistry) -> None:
        self.registry = registry

    async def Encode(self, request: tokenizer_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> tokenizer_pb2.EncodeResponse:
        bundle = self.registry.get(request.model)
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
