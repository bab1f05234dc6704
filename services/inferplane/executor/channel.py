"""The executor's side of ``ExecutorService.Channel``: many sequences on one stream, one frame per flush.

A ``ChannelSession`` serves one channel (one router). It reads batched opens and cancels, starts each sequence
on the ``GenerationBackend`` with itself as the ``SequenceSink``, and writes what the backend reports as
column-wise ``ChannelFrame``s: the events of one event-loop iteration (one scheduling round of the backend) go
out together, and while the router reads slowly they keep merging into the next frame, so a frame never waits
for a consumer and a slow one gets fewer, larger frames.

Each session also subscribes to the executor's ``BlockBook``: the blocks its models' prefix caches gain and lose
go to the router in ``ChannelFrame.blocks`` (a snapshot of every model first), merged per model while the router
reads slowly, like the tokens.

Per sequence, the session enforces the open's relative timeout (the router's cancel may be lost) and keeps the
executor's gauges and counters. A channel that breaks (the router is gone) cancels every sequence on it. While
the executor drains, new opens fail with UNAVAILABLE (the router retries them elsewhere), live sequences run to
their end, and the stream then ends with OK.

``PerRequestBackend`` runs each sequence as one Triton stream (``TritonLLMClient.generate``); the step backend
(``triton_channel``) plugs in through the same ``GenerationBackend`` protocol (``backend.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Hashable, Sequence
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from prometheus_client import Counter, Gauge, Histogram

from inferplane.common.errors import DeadlineExceeded, InferplaneError, Unavailable
from inferplane.common.wire import CANCELLED, FINISH_TO_PB, LENGTH, STOP
from inferplane.executor.backend import GenerationBackend, SequenceSink
from inferplane.executor.block_book import BlockBook
from inferplane.executor.service import ACTIVE, FINISHED, QUEUE_DEPTH, TRITON_CANCELS, params_from_pb
from inferplane.executor.triton_client import GenerateParams, TritonLLMClient
from inferplane.modeling.blocks import BlockChanges
from inferplane.v1 import common_pb2, executor_pb2

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

CHANNELS = Gauge("inferplane_executor_channels", "Channels (routers) connected to this executor")
FRAMES = Counter("inferplane_executor_channel_frames", "Frames written on channels")
TOKENS = Counter("inferplane_executor_channel_tokens", "Token ids written on channels")
SEQUENCES_PER_FRAME = Histogram("inferplane_executor_channel_sequences_per_frame",
                                "Sequences with news (tokens, end, failure) in one frame",
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
OPENS_REFUSED = Counter("inferplane_executor_channel_opens_refused", "Opens refused at once, by reason", ["reason"])


# --- frames -----------------------------------------------------------------------------------------------


class FrameBuilder:
    """The next frame of a channel, column-wise, built as events arrive (merged per sequence)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._tokens: dict[int, list[int]] = {}  # seq -> new ids, in arrival order of the sequences
        self._logprobs: dict[int, list[float]] = {}
        self._top: dict[int, tuple[int, list[int], list[float]]] = {}  # seq -> (k, ids, logprobs)
        self._ended: list[executor_pb2.SequenceEnd] = []
        self._failed: list[executor_pb2.SequenceFailure] = []
        self._blocks: dict[str, BlockChanges] = {}  # model -> its prefix cache's changes (or snapshot)

    def __bool__(self) -> bool:
        return bool(self._tokens or self._ended or self._failed or self._blocks)

    def blocks(self, model: str, reset: bool, stored: Sequence[int], removed: Sequence[int]) -> None:
        """A model's prefix cache changed (``BlockBook``): merged with what the frame holds for it already."""
        changes = self._blocks.setdefault(model, BlockChanges())
        if reset:
            changes.snapshot(stored)
        else:
            changes.change(stored, removed)

    def tokens(self, seq: int, token_ids: Sequence[int], logprobs: Sequence[float], top_k: int = 0,
               top_ids: Sequence[int] = (), top_logprobs: Sequence[float] = ()) -> None:
        self._tokens.setdefault(seq, []).extend(token_ids)
        if logprobs:
            assert len(logprobs) == len(token_ids), "one log-probability per token id"
            self._logprobs.setdefault(seq, []).extend(logprobs)
        if top_k:
            assert len(top_ids) == len(top_logprobs) == top_k * len(token_ids), "top_k alternatives per token"
            _, ids, lps = self._top.setdefault(seq, (top_k, [], []))
            ids.extend(top_ids)
            lps.extend(top_logprobs)

    def finish(self, seq: int, reason: str, prompt_tokens: int, completion_tokens: int,
               cached_tokens: int = 0) -> None:
        usage = common_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                 total_tokens=prompt_tokens + completion_tokens, cached_tokens=cached_tokens)
        self._ended.append(executor_pb2.SequenceEnd(
            seq=seq, finish_reason=FINISH_TO_PB.get(reason, common_pb2.FINISH_REASON_ERROR), usage=usage))

    def fail(self, seq: int, error: InferplaneError) -> None:
        self._failed.append(executor_pb2.SequenceFailure(seq=seq, code=error.code.value[0], reason=error.reason,
                                                         message=error.message, param=error.param or ""))

    def take(self, heartbeat: Sequence[int] | None = None) -> executor_pb2.ChannelFrame:
        """The frame (with a heartbeat listing ``heartbeat`` when given); the builder starts afresh."""
        frame = executor_pb2.ChannelFrame(seq=list(self._tokens), count=[len(v) for v in self._tokens.values()],
                                          token_ids=[t for v in self._tokens.values() for t in v],
                                          ended=self._ended, failed=self._failed)
        if self._logprobs:  # a sequence without them gets NaN, so that the column stays aligned with token_ids
            frame.logprobs.extend(p for s, ids in self._tokens.items()
                                  for p in self._logprobs.get(s, [float("nan")] * len(ids)))
        if self._top:  # k per seq entry (0: none), then the alternatives of those that have them, in seq order
            frame.top_counts.extend(self._top[s][0] if s in self._top else 0 for s in self._tokens)
            for s in self._tokens:
                if s in self._top:
                    frame.top_token_ids.extend(self._top[s][1])
                    frame.top_logprobs.extend(self._top[s][2])
        for model, changes in self._blocks.items():
            reset, stored, removed = changes.take()
            frame.blocks.add(model=model, reset=reset, stored=stored, removed=removed)
        if heartbeat is not None:
            frame.heartbeat.active.extend(heartbeat)
        self._reset()
        return frame


# --- one channel ------------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class LiveSequence:
    """A sequence the backend runs for this channel; the object itself is the backend's key (unique across
    channels, which number their sequences independently)."""

    seq: int
    request_id: str
    queued: bool = True  # no token yet
    expired: bool = False  # its timeout passed: it was cancelled here
    timer: asyncio.TimerHandle | None = None
    span: trace.Span | None = None
    omit_logprobs: bool = False  # the router asked for none (``ExecutorGenerateRequest.omit_logprobs``)


class ChannelSession(SequenceSink):
    """One channel's sequences and frames. ``run`` is the response stream; the backend calls the sink methods."""

    _ids = itertools.count(1)

    def __init__(self, service: ChannelService) -> None:
        self._service = service
        self._backend = service.backend
        self.id = next(self._ids)
        self._live: dict[int, LiveSequence] = {}
        self._frame = FrameBuilder()
        self._wake = asyncio.Event()
        self._beat_due = False
        self._beat: asyncio.TimerHandle | None = None
        self._requests_done = False
        self._closed = False

    @property
    def live(self) -> int:
        return len(self._live)

    async def run(self, requests: AsyncIterator[executor_pb2.ChannelRequest]) -> AsyncGenerator[
            executor_pb2.ChannelFrame]:
        reader = asyncio.create_task(self._read(requests))
        self._schedule_beat()
        CHANNELS.inc()
        self._service.blocks.subscribe(self)  # a snapshot of every model's blocks goes out in the first frame
        try:
            while True:
                await self._wake.wait()
                # One more turn of the loop before the frame is taken: the other sequences' events of this round
                # that are ready too (their reads completed together) join it.
                await asyncio.sleep(0)
                self._wake.clear()
                if self._frame or self._beat_due:
                    yield self._take()
                if reader.done() and not self._requests_done:
                    reader.result()  # the router's stream failed: raised here, the RPC ends with it
                if (self._requests_done or self._service.draining) and not self._live and not self._frame:
                    return  # every end written (one that came while the last frame was sent sets _wake again)
        finally:
            CHANNELS.dec()
            self._service.blocks.unsubscribe(self)
            if self._beat is not None:
                self._beat.cancel()
            reader.cancel()
            self._close()

    def wake(self) -> None:
        self._wake.set()

    def blocks(self, model: str, reset: bool, stored: Sequence[int], removed: Sequence[int]) -> None:
        """``BlockSubscriber``: a model's prefix-cache change, for the next frame."""
        if not self._closed:
            self._frame.blocks(model, reset, stored, removed)
            self._wake.set()

    def _schedule_beat(self) -> None:
        self._beat = asyncio.get_running_loop().call_later(self._service.heartbeat_s, self._beat_now)

    def _beat_now(self) -> None:
        self._beat_due = True
        self._wake.set()

    def _take(self) -> executor_pb2.ChannelFrame:
        heartbeat = None
        if self._beat_due:
            heartbeat, self._beat_due = sorted(self._live), False
            self._schedule_beat()
        frame = self._frame.take(heartbeat)
        FRAMES.inc()
        TOKENS.inc(len(frame.token_ids))
        news = len(frame.seq) + len(frame.ended) + len(frame.failed)
        if news:
            SEQUENCES_PER_FRAME.observe(news)
        return frame

    async def _read(self, requests: AsyncIterator[executor_pb2.ChannelRequest]) -> None:
        try:
            async for req in requests:
                for op in req.opens:
                    self._open(op)
                for seq in req.cancels:
                    self.cancel(seq)
            # The router closed its side: it is leaving. Its sequences are cancelled; the stream ends once they
            # have all reported their end.
            self._requests_done = True
            for seq in list(self._live):
                self.cancel(seq)
        finally:
            self._wake.set()

    def _open(self, op: executor_pb2.SequenceOpen) -> None:
        seq = op.seq
        if seq in self._live:
            log.warning("channel %d: sequence %d opened twice; the second open is ignored", self.id, seq)
            return
        if self._service.draining:
            OPENS_REFUSED.labels("draining").inc()
            self._frame.fail(seq, Unavailable("this executor is draining; retry on another replica"))
            self._wake.set()
            return
        try:
            params = params_from_pb(op.request)
        except InferplaneError as exc:
            OPENS_REFUSED.labels("invalid").inc()
            self._frame.fail(seq, exc)
            self._wake.set()
            return
        live = self._live[seq] = LiveSequence(seq, op.request.request_id, omit_logprobs=op.request.omit_logprobs)
        self._service.active += 1
        ACTIVE.inc()
        QUEUE_DEPTH.inc()
        if op.timeout_ms:
            live.timer = asyncio.get_running_loop().call_later(op.timeout_ms / 1000, self._expire, live)
        self._start(live, op.request.model, params, op.traceparent)

    def _start(self, live: LiveSequence, model: str, params: GenerateParams, traceparent: str) -> None:
        """``backend.open`` in the sequence's trace context: its own span under the caller's when it is sampled,
        none otherwise (the channel's long-lived RPC is no request's parent)."""
        ctx = otel_context.Context()
        if traceparent:
            parent = propagate.extract({"traceparent": traceparent})
            live.span = tracer.start_span("inferplane.executor.sequence", context=parent,
                                          kind=trace.SpanKind.SERVER,
                                          attributes={"inferplane.request_id": live.request_id,
                                                      "gen_ai.request.model": model})
            ctx = trace.set_span_in_context(live.span, parent)
        token = otel_context.attach(ctx)
        try:
            self._backend.open(live, model, params, live.request_id, self)
        except Exception as exc:  # the backend's fault, not the channel's: this sequence fails alone
            log.exception("channel %d: the backend could not open sequence %d", self.id, live.seq)
            self.failed(live, InferplaneError(f"internal error: {type(exc).__name__}"))
        finally:
            otel_context.detach(token)

    def cancel(self, seq: int) -> None:
        live = self._live.get(seq)
        if live is not None:
            self._backend.cancel(live)

    def _expire(self, live: LiveSequence) -> None:
        live.expired = True
        self._backend.cancel(live)

    def _close(self) -> None:
        """The stream ended (the router left, or the executor stops): nothing more is written; what is live is
        cancelled and still counted when it ends."""
        self._closed = True
        for seq in list(self._live):
            self.cancel(seq)
        self._service.sessions.discard(self)

    # --- SequenceSink: called by the backend -------------------------------------------------------------

    def tokens(self, key: Hashable, token_ids: Sequence[int], logprobs: Sequence[float], top_k: int = 0,
               top_ids: Sequence[int] = (), top_logprobs: Sequence[float] = ()) -> None:
        assert isinstance(key, LiveSequence)
        if self._live.get(key.seq) is not key:
            return  # already ended: the backend broke its contract, the frame must not
        if key.queued:
            key.queued = False
            QUEUE_DEPTH.dec()
        if not self._closed:
            self._frame.tokens(key.seq, token_ids, () if key.omit_logprobs else logprobs, top_k, top_ids, top_logprobs)
            self._wake.set()

    def finished(self, key: Hashable, reason: str, prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int = 0) -> None:
        assert isinstance(key, LiveSequence)
        if not self._end(key, ran_out=reason in (STOP, LENGTH)):
            return
        if key.expired and reason == CANCELLED:
            self._frame.fail(key.seq, DeadlineExceeded("the sequence ran past its timeout"))
        else:
            self._frame.finish(key.seq, reason, prompt_tokens, completion_tokens, cached_tokens)

    def failed(self, key: Hashable, error: InferplaneError) -> None:
        assert isinstance(key, LiveSequence)
        if self._end(key, ran_out=False):
            self._frame.fail(key.seq, error)

    def _end(self, live: LiveSequence, *, ran_out: bool) -> bool:
        """Forget an ending sequence and count it; whether its end is to be written."""
        if self._live.get(live.seq) is not live:
            return False
        del self._live[live.seq]
        self._service.active -= 1
        ACTIVE.dec()
        if live.queued:
            QUEUE_DEPTH.dec()
        (FINISHED if ran_out else TRITON_CANCELS).inc()
        if live.timer is not None:
            live.timer.cancel()
        if live.span is not None:
            live.span.end()
        self._wake.set()
        return not self._closed


class ChannelService:
    """Every channel of this executor, over one backend; ``drain`` at SIGTERM."""

    def __init__(self, backend: GenerationBackend, *, heartbeat_s: float = 1.0,
                 blocks: BlockBook | None = None) -> None:
        self.backend = backend
        self.heartbeat_s = heartbeat_s
        self.blocks = blocks if blocks is not None else BlockBook()  # the models' prefix-cache blocks
        self.sessions: set[ChannelSession] = set()
        self.active = 0  # live sequences on all channels
        self.draining = False

    async def serve(self, requests: AsyncIterator[executor_pb2.ChannelRequest]) -> AsyncGenerator[
            executor_pb2.ChannelFrame]:
        session = ChannelSession(self)
        self.sessions.add(session)
        # closed with this generator, in the RPC's task (an inner generator left open ends only when collected)
        async with contextlib.aclosing(session.run(requests)) as frames:
            async for frame in frames:
                yield frame

    def drain(self) -> None:
        """Refuse new opens (UNAVAILABLE); each channel ends once its live sequences have."""
        self.draining = True
        for session in self.sessions:
            session.wake()

    async def close(self) -> None:
        await self.backend.close()


# --- the per-request backend ------------------------------------------------------------------------------


class PerRequestBackend(GenerationBackend):
    """One Triton ``ModelStreamInfer`` stream per sequence, read by a task of its own (Triton's per-request
    contract): what the executor's ``Generate`` does, behind the channel."""

    def __init__(self, client: TritonLLMClient) -> None:
        self._client = client
        self._tasks: dict[Hashable, asyncio.Task[None]] = {}

    def open(self, key: Hashable, model: str, params: GenerateParams, request_id: str, sink: SequenceSink) -> None:
        assert key not in self._tasks, "a key is unique among live sequences"
        self._tasks[key] = asyncio.create_task(self._run(key, model, params, request_id, sink))

    def cancel(self, key: Hashable) -> None:
        task = self._tasks.get(key)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, key: Hashable, model: str, params: GenerateParams, request_id: str,
                   sink: SequenceSink) -> None:
        chunks = self._client.generate(model, params, request_id=request_id)
        produced = 0
        try:
            async for chunk in chunks:
                if chunk.token_ids:
                    produced += len(chunk.token_ids)
                    sink.tokens(key, chunk.token_ids, chunk.logprobs, chunk.top_k, chunk.top_ids, chunk.top_logprobs)
                if chunk.finish_reason is not None:
                    # Ended: a cancel from now on is a no-op (it must not cancel the finished Triton stream).
                    self._tasks.pop(key, None)
                    sink.finished(key, chunk.finish_reason, chunk.prompt_tokens, chunk.completion_tokens,
                                  chunk.cached_tokens)
                    return
        except asyncio.CancelledError:
            self._tasks.pop(key, None)
            sink.finished(key, CANCELLED, len(params.prompt_token_ids), produced)
        except InferplaneError as exc:
            self._tasks.pop(key, None)
            sink.failed(key, exc)
        except Exception as exc:
            log.exception("generation %s failed", request_id)
            self._tasks.pop(key, None)
            sink.failed(key, InferplaneError(f"internal error: {type(exc).__name__}"))
        finally:
            self._tasks.pop(key, None)
            if isinstance(chunks, AsyncGenerator):  # now, not when collected; a finished Triton stream is left to
                await chunks.aclose()  # end by itself there (triton_client.generate)
