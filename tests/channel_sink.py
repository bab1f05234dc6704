"""A ``SequenceSink`` for the step backend's tests: records every event, and counts frames as the executor's channel
sink would send them (the first event after a flush schedules the next flush with ``loop.call_soon``, so the events
a backend delivers in one go, without an ``await`` between them, count as one frame)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from inferplane.common.errors import InferplaneError


@dataclass
class Ended:
    reason: str | None = None  # "stop" | "length" | "cancelled"; None when failed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: InferplaneError | None = None
    cached_tokens: int = 0


@dataclass
class RecordingSink:
    tokens_of: dict[Hashable, list[int]] = field(default_factory=dict)
    logprobs_of: dict[Hashable, list[float]] = field(default_factory=dict)
    ended: dict[Hashable, Ended] = field(default_factory=dict)
    frames: int = 0  # flushes: one per batch of events delivered in one go
    token_calls: int = 0
    after_end: list[Hashable] = field(default_factory=list)  # events after a sequence's end (must stay empty)
    _flush_pending: bool = False

    def _event(self, key: Hashable) -> None:
        if key in self.ended:
            self.after_end.append(key)
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        self.frames += 1

    def tokens(self, key: Hashable, token_ids: Sequence[int], logprobs: Sequence[float], top_k: int = 0,
               top_ids: Sequence[int] = (), top_logprobs: Sequence[float] = ()) -> None:
        self._event(key)
        assert token_ids and len(token_ids) == len(logprobs), (key, token_ids, logprobs)
        self.tokens_of.setdefault(key, []).extend(token_ids)
        self.logprobs_of.setdefault(key, []).extend(logprobs)
        self.token_calls += 1

    def finished(self, key: Hashable, reason: str, prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int = 0) -> None:
        self._event(key)
        self.ended[key] = Ended(reason, prompt_tokens, completion_tokens, cached_tokens=cached_tokens)

    def failed(self, key: Hashable, error: InferplaneError) -> None:
        self._event(key)
        self.ended[key] = Ended(error=error)

    async def wait_ended(self, keys: Iterable[Hashable], timeout: float = 60) -> None:
        wanted = set(keys)
        deadline = time.monotonic() + timeout
        while not wanted <= set(self.ended):
            missing = sorted(map(str, wanted - set(self.ended)))
            assert time.monotonic() < deadline, f"not ended after {timeout}s: {missing}"
            await asyncio.sleep(0.01)

    async def wait_tokens(self, key: Hashable, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.tokens_of.get(key, [])) < n:
            assert time.monotonic() < deadline, f"{key}: fewer than {n} tokens after {timeout}s"
            assert key not in self.ended, f"{key} ended early: {self.ended[key]}"
            await asyncio.sleep(0.005)


class PerRequestBackend:
    """A minimal per-request ``GenerationBackend`` (one ``TritonLLMClient.generate`` stream per sequence), as the
    step backend's ``fallback`` in tests; the executor's own per-request backend is the channel's business."""

    def __init__(self, url: str) -> None:
        from inferplane.executor.triton_client import TritonLLMClient

        self.client = TritonLLMClient(url)
        self.tasks: dict[Hashable, asyncio.Task[None]] = {}
        self.opened: list[Hashable] = []

    def open(self, key: Hashable, model: str, params: Any, request_id: str, sink: Any) -> None:
        self.opened.append(key)
        self.tasks[key] = asyncio.get_running_loop().create_task(self._run(key, model, params, request_id, sink))

    async def _run(self, key: Hashable, model: str, params: Any, request_id: str, sink: Any) -> None:
        got = 0
        try:
            async for chunk in self.client.generate(model, params, request_id=request_id):
                if chunk.token_ids:
                    got += len(chunk.token_ids)
                    sink.tokens(key, chunk.token_ids, [0.0] * len(chunk.token_ids))
                if chunk.finish_reason is not None:
                    sink.finished(key, chunk.finish_reason, chunk.prompt_tokens, chunk.completion_tokens)
        except asyncio.CancelledError:
            sink.finished(key, "cancelled", len(params.prompt_token_ids), got)
        except InferplaneError as e:
            sink.failed(key, e)
        finally:
            self.tasks.pop(key, None)

    def cancel(self, key: Hashable) -> None:
        task = self.tasks.get(key)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await self.client.close()
