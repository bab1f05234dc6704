"""The one tokenization interface the mesh codes against, whatever does the work.

Two implementations: ``LocalTokenizer`` (``inferplane.tokenization.local``: ``tokenizer.json`` and the chat
template in this process) and ``GrpcTokenizer`` (``inferplane.tokenization.remote``: the tokenizer service's
``Encode``, ``EncodeBatch`` and ``DecodeStream``). The router's settings pick one for encoding and one for
detokenizing; ``SplitTokenizer`` joins two when they differ.

The methods are async because the gRPC one is; the local one never suspends. Both raise the domain errors of
``inferplane.common.errors`` (``InvalidArgument`` for a conversation the template refuses, ``NotFound`` for
a model without a tokenizer), so callers catch the same exceptions either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from inferplane.v1 import common_pb2


@dataclass(frozen=True, slots=True)
class Encoded:
    """A prompt as the model reads it, and the ids that end its generation (EOS, the template's end-of-turn)."""

    token_ids: list[int]
    stop_token_ids: list[int]


class TextDecoder(Protocol):
    """One generation's streamed ids → text deltas that never split a UTF-8 character.

    ``push`` returns the text its ids complete ("" while a character is incomplete); ``final=True`` also
    returns everything held back. ``close`` releases what the decoder holds (a stream), once, at the end.
    """

    async def push(self, token_ids: list[int], *, final: bool = False) -> str: ...

    async def close(self) -> None: ...


class Tokenizer(Protocol):
    """Per-model encoding (text, chat, batches) and incremental decoding. ``model`` is the catalog's model id;
    ``timeout`` (seconds) bounds a call that leaves the process (the local implementation ignores it)."""

    async def encode_text(self, model: str, text: str, *, timeout: float | None) -> Encoded:
        """``text``'s ids as is: no special tokens are added (a completion prompt)."""
        ...

    async def encode_chat(self, model: str, messages: Sequence[common_pb2.ChatMessage], *,
                          timeout: float | None) -> Encoded:
        """The conversation rendered with the model's chat template (and a generation prompt), encoded."""
        ...

    async def encode_batch(self, model: str, texts: Sequence[str], *, add_special_tokens: bool,
                           timeout: float | None) -> list[list[int]]:
        """Each text's ids, in order; ``add_special_tokens`` adds the tokenizer's own (BERT's [CLS] ... [SEP])."""
        ...

    def decoder(self, model: str, *, timeout: float | None) -> TextDecoder:
        """A decoder for one stream of generated ids; special tokens are left out of its text."""
        ...

    async def decode(self, model: str, token_ids: Sequence[int], *, timeout: float | None) -> str:
        """The text of ``token_ids`` in one call, special tokens kept (``/detokenize``); an id outside the
        vocabulary is an ``InvalidArgument``."""
        ...

    async def token_bytes(self, model: str, token_ids: Sequence[int], *, timeout: float | None) -> list[bytes]:
        """Each id's own bytes (logprobs' ``token`` and ``bytes``): exact in process; through the tokenizer
        service, each id's decoded text (a token holding part of a UTF-8 character reads as U+FFFD there)."""
        ...


class SplitTokenizer:
    """Encodes with one implementation and decodes with another (``tokenize: local``, ``detokenize: remote``)."""

    def __init__(self, *, encoder: Tokenizer, decoder: Tokenizer) -> None:
        self._encoder = encoder
        self._decoder = decoder

    @property
    def parts(self) -> tuple[Tokenizer, Tokenizer]:
        """The encoder and the decoder."""
        return self._encoder, self._decoder

    async def encode_text(self, model: str, text: str, *, timeout: float | None) -> Encoded:
        return await self._encoder.encode_text(model, text, timeout=timeout)

    async def encode_chat(self, model: str, messages: Sequence[common_pb2.ChatMessage], *,
                          timeout: float | None) -> Encoded:
        return await self._encoder.encode_chat(model, messages, timeout=timeout)

    async def encode_batch(self, model: str, texts: Sequence[str], *, add_special_tokens: bool,
                           timeout: float | None) -> list[list[int]]:
        return await self._encoder.encode_batch(model, texts, add_special_tokens=add_special_tokens, timeout=timeout)

    def decoder(self, model: str, *, timeout: float | None) -> TextDecoder:
        return self._decoder.decoder(model, timeout=timeout)

    async def decode(self, model: str, token_ids: Sequence[int], *, timeout: float | None) -> str:
        return await self._decoder.decode(model, token_ids, timeout=timeout)

    async def token_bytes(self, model: str, token_ids: Sequence[int], *, timeout: float | None) -> list[bytes]:
        return await self._decoder.token_bytes(model, token_ids, timeout=timeout)
