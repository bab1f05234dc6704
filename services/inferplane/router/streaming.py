"""The two ends of a generation's stream: the executor's ``Generate`` call, and the text deltas it becomes."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from inferplane.common.server import close_stream
from inferplane.router.stops import StopMatcher
from inferplane.tokenization import TextDecoder
from inferplane.v1 import common_pb2, executor_pb2, router_pb2

Message = executor_pb2.ExecutorGenerateResponse


@dataclass(slots=True)
class Delta:
    text: str
    token_count: int
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those the model reused from its prefix cache
    completion_tokens: int = 0
    # On the final message: what the request cost (None: the model is not priced).
    cost_nanodollars: int | None = None
    # On the final message: the stop sequence that ended the generation (None: none matched).
    stop_sequence: str | None = None
    # The choice (0 to n - 1) this delta belongs to.
    index: int = 0
    # With logprobs: one entry per token of this delta.
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    # Tool calls (parts of them) made in this delta.
    tool_calls: list[router_pb2.ToolCallDelta] = field(default_factory=list)
    # The request's last delta: it carries the usage of all choices (and the cost).
    last: bool = False
    # The public model id serving the request (a fallback's when the model asked for could not serve).
    model: str = ""
    # The service tier serving it (``wire`` names; "" on deltas not from ``GenerationEngine.generate``).
    service_tier: str = ""


class ExecutorStream:
    """An executor ``Generate`` call whose first message has arrived (or that ended without one).

    Iterating yields every message, the first included. Leaving ``async with`` closes the call: cancelled
    (which cancels the executor's Triton request) unless its final message arrived, and always run out, so its
    client span ends now.
    """

    def __init__(self, call: Any, first: Message | None) -> None:
        self._call = call
        self._first = first
        self._ended = first is None
        self.finished = False  # the final message (with a finish reason) arrived

    @classmethod
    async def open(cls, call: Any) -> ExecutorStream:
        """Wait for the call's first message (a failure here may still be retried on another replica)."""
        try:
            first = await call.__aiter__().__anext__()
        except StopAsyncIteration:
            return cls(call, None)
        except BaseException:
            await close_stream(call)
            raise
        return cls(call, first)

    def __aiter__(self) -> ExecutorStream:
        return self

    async def __anext__(self) -> Message:
        if self._ended:
            raise StopAsyncIteration
        if self._first is not None:
            msg, self._first = self._first, None
        else:
            msg = await self._call.__aiter__().__anext__()
        if msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.finished = True
        return msg

    async def __aenter__(self) -> ExecutorStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await close_stream(self._call, cancel=not self.finished)


class TextOut:
    """Token ids in, the caller's text deltas out: detokenize incrementally, hold back what may start a stop
    sequence, and count the tokens each delta carries (``pending``: tokens whose text has not been sent yet, an
    incomplete character or a held stop prefix). Leaving ``async with`` closes the decoder."""

    def __init__(self, decoder: TextDecoder, stops: list[str]) -> None:
        self._decoder = decoder
        self._stops = StopMatcher(stops)
        self.received = 0  # token ids received from the executor
        self.pending = 0

    @property
    def stopped(self) -> bool:
        """A stop sequence matched (the text ends before it)."""
        return self._stops.matched

    @property
    def stop_sequence(self) -> str | None:
        """The stop sequence that matched, if one did."""
        return self._stops.which

    async def push(self, token_ids: Sequence[int]) -> Delta | None:
        self.received += len(token_ids)
        self.pending += len(token_ids)
        return self._delta(self._stops.feed(await self._decoder.push(list(token_ids))))

    async def flush(self) -> Delta | None:
        """The text still held at the end of a generation (it may complete a stop sequence)."""
        if self.stopped:
            return None
        tail = self._stops.feed(await self._decoder.push([], final=True))
        return self._delta(tail + self._stops.flush())

    def unsent(self, completion_tokens: int) -> int:
        """Tokens the final delta carries: those not sent yet, plus those that never produced text (an end-of-turn
        token the model counts but does not stream), so that all deltas add up to ``completion_tokens``."""
        return self.pending + max(0, completion_tokens - self.received)

    def _delta(self, text: str) -> Delta | None:
        if not text:
            return None
        delta = Delta(text, self.pending)
        self.pending = 0
        return delta

    async def __aenter__(self) -> TextOut:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        with contextlib.suppress(Exception):  # closing a decoder stream that already failed is not worth raising
            await self._decoder.close()
