"""What the executor's channel (``ExecutorService.Channel``) asks of whatever runs the generations.

A ``GenerationBackend`` runs many sequences at once and reports what happens to each through the
``SequenceSink`` the sequence was opened with. Two backends implement it:
- the per-request one: one Triton ``ModelStreamInfer`` stream per sequence (Triton's per-request contract);
- the step one (``triton_channel``): one Triton stream per executor and model, the decoupled model sending
  one response per scheduling round that carries every sequence's new tokens.

Rules both keep:
- every call happens on the event loop's thread; sink methods never block and never raise;
- after ``open``, a sequence gets any number of ``tokens`` calls, then exactly one ``finished`` or
  ``failed``, then nothing more (a refused open is a ``failed`` with ``InvalidArgument``; a broken Triton
  stream fails every sequence on it with ``Unavailable``);
- ``cancel`` of a live sequence stops it in Triton and ends with ``finished(key, "cancelled", ...)`` (or
  ``failed``); ``cancel`` of an unknown or ended key is a no-op;
- events of one scheduling round are delivered in one go (without an ``await`` between them), so a sink that
  flushes with ``loop.call_soon`` sends them as one frame.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

from inferplane.common.errors import InferplaneError
from inferplane.executor.triton_client import GenerateParams


class SequenceSink(Protocol):
    """Receives the events of the sequences opened with it (one per channel)."""

    def tokens(self, key: Hashable, token_ids: Sequence[int], logprobs: Sequence[float], top_k: int = 0,
               top_ids: Sequence[int] = (), top_logprobs: Sequence[float] = ()) -> None:
        """New tokens of ``key``, in order (``logprobs``: the model's log-probability of each, or empty; with
        ``top_k``, ``top_k`` alternatives per token, most likely first, in ``top_ids``/``top_logprobs``)."""

    def finished(self, key: Hashable, reason: str, prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int = 0) -> None:
        """``key`` ended: ``reason`` is "stop", "length" or "cancelled"; the counts are the model's
        (``cached_tokens``: of the prompt's tokens, those whose keys came from the model's prefix cache)."""

    def failed(self, key: Hashable, error: InferplaneError) -> None:
        """``key`` ended with an error (refused, or its model or Triton failed)."""


class GenerationBackend(Protocol):
    def open(self, key: Hashable, model: str, params: GenerateParams, request_id: str, sink: SequenceSink) -> None:
        """Start generating for ``key`` (unique among live sequences); returns at once, events go to ``sink``."""

    def cancel(self, key: Hashable) -> None:
        """Stop ``key``; it still ends with one ``finished`` ("cancelled") or ``failed``."""

    async def close(self) -> None:
        """Fail or cancel what is live and release the backend's streams."""
