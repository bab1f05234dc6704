"""Tokenization in this process: a registry of the catalog's tokenizer bundles, and ``LocalTokenizer`` over it.

The tokenizer service serves this same code (``inferplane.tokenizer.service``); the router runs it in process
by default, so a request makes no round trip before the executor and no hop per streamed message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from inferplane.common.catalog import Catalog, load_catalog
from inferplane.common.errors import InvalidArgument, NotFound
from inferplane.tokenization.api import Encoded
from inferplane.tokenization.bundle import TokenizerBundle
from inferplane.tokenization.detok import IncrementalDecoder
from inferplane.v1 import common_pb2

log = logging.getLogger(__name__)


def message_dicts(messages: Iterable[common_pb2.ChatMessage]) -> list[dict[str, Any]]:
    """ChatMessage protos as the plain dicts a chat template reads (``name`` only when set)."""
    return [_message_dict(m) for m in messages]


def _message_dict(message: common_pb2.ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.HasField("name"):
        out["name"] = message.name
    return out


class TokenizerRegistry:
    """Model id → its ``TokenizerBundle``, from the folders the catalog names.

    A bundle loads on first use (the router: only the models it serves cost memory and start time), or all at
    once with ``load_all`` (the tokenizer service: a bad folder fails at start, not on a request).
    """

    def __init__(self, paths: Mapping[str, Path] | None = None, *,
                 bundles: Mapping[str, TokenizerBundle] | None = None) -> None:
        self._paths = dict(paths or {})
        self._bundles = dict(bundles or {})

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> TokenizerRegistry:
        return cls({model.id: model.tokenizer for model in catalog.models})

    @classmethod
    def from_catalog_file(cls, path: Path) -> TokenizerRegistry:
        return cls.from_catalog(load_catalog(path))

    def set_paths(self, paths: Mapping[str, Path]) -> None:
        """Serve these models from now on (the catalog changed); a model whose folder moved loads again."""
        for model_id, path in paths.items():
            if self._paths.get(model_id) != path:
                self._bundles.pop(model_id, None)
        for model_id in set(self._paths) - set(paths):
            self._bundles.pop(model_id, None)
        self._paths = dict(paths)

    @property
    def model_ids(self) -> list[str]:
        return list(dict.fromkeys([*self._bundles, *self._paths]))

    def load_all(self) -> TokenizerRegistry:
        for model_id in self.model_ids:
            self.get(model_id)
        return self

    def get(self, model_id: str) -> TokenizerBundle:
        bundle = self._bundles.get(model_id)
        if bundle is None:
            bundle = self._bundles[model_id] = self._load(model_id)
        return bundle

    def _load(self, model_id: str) -> TokenizerBundle:
        if not model_id:
            raise InvalidArgument("model is required", param="model")
        path = self._paths.get(model_id)
        if path is None:
            raise NotFound(f"model {model_id!r} has no tokenizer here (known: {', '.join(self.model_ids)})",
                           param="model")
        start = time.perf_counter()
        bundle = TokenizerBundle.from_dir(path, name=model_id)
        log.info("loaded tokenizer %s from %s: vocab %d, chat template %s, stop ids %s (%.0f ms)",
                 model_id, path, bundle.vocab_size, "yes" if bundle.chat_template else "no",
                 bundle.stop_token_ids, (time.perf_counter() - start) * 1000)
        return bundle


class LocalDecoder:
    """``IncrementalDecoder`` behind the ``TextDecoder`` interface: nothing to close, nothing awaited inside."""

    __slots__ = ("_decoder",)

    def __init__(self, decoder: IncrementalDecoder) -> None:
        self._decoder = decoder

    async def push(self, token_ids: list[int], *, final: bool = False) -> str:
        text = self._decoder.push(token_ids) if token_ids else ""
        return text + self._decoder.flush() if final else text

    async def close(self) -> None:
        return None


class LocalTokenizer:
    """The ``Tokenizer`` interface in process, over a ``TokenizerRegistry``."""

    def __init__(self, registry: TokenizerRegistry) -> None:
        self.registry = registry

    async def encode_text(self, model: str, text: str, *, timeout: float | None) -> Encoded:
        bundle = self.registry.get(model)
        return Encoded(bundle.encode(text), list(bundle.stop_token_ids))

    async def encode_chat(self, model: str, messages: Sequence[common_pb2.ChatMessage], *,
                          timeout: float | None) -> Encoded:
        bundle = self.registry.get(model)
        return Encoded(bundle.encode_chat(message_dicts(messages))[0], list(bundle.stop_token_ids))

    async def encode_batch(self, model: str, texts: Sequence[str], *, add_special_tokens: bool,
                           timeout: float | None) -> list[list[int]]:
        return self.registry.get(model).encode_batch(texts, add_special_tokens=add_special_tokens)

    def decoder(self, model: str, *, timeout: float | None) -> LocalDecoder:
        return LocalDecoder(IncrementalDecoder(self.registry.get(model), skip_special_tokens=True))

    async def decode(self, model: str, token_ids: Sequence[int], *, timeout: float | None) -> str:
        return self.registry.get(model).decode(token_ids, skip_special_tokens=False)

    async def token_bytes(self, model: str, token_ids: Sequence[int], *, timeout: float | None) -> list[bytes]:
        return self.registry.get(model).token_bytes(token_ids)
