"""The router's side of ``ExecutorService.Channel``: one long-lived stream per executor replica, each request a
sequence on it.

``ExecutorChannel`` belongs to one replica. Its stream (a ``_Link``) is opened with the first request and again
after a break. Opens and cancels written in one event-loop iteration go out as one ``ChannelRequest``; a reader
hands each frame's columns to the sequences' buffers and never waits for a consumer (a consumer that falls
behind gets the tokens that piled up merged into one message); a watchdog breaks a channel that stays silent (no
frame, no heartbeat) for ``silence_s`` while sequences are live.

``ChannelSequence`` is what the engine iterates, as it did the per-request ``ExecutorStream``: it is returned
once its first event arrived (so ``ReplicaSet.open`` may still retry it elsewhere), yields
``ExecutorGenerateResponse`` messages (token ids; the last one with finish reason and usage) and, when left
before its end, cancels the sequence. A failure the executor reports for a sequence is raised as the
``AioRpcError`` a ``Generate`` call would have failed with (code, message, ErrorInfo reason and param), so that
retry, ejection and error mapping are the same for both paths; a broken channel fails its sequences with
UNAVAILABLE (those without a token yet are retried by ``ReplicaSet.open``). The request's deadline bounds every
wait.

A frame's ``blocks`` (what the executor's models' prefix caches gained and lost) go to the channel's
``BlockListener`` (the router's ``PrefixIndex``), before the frame's tokens; a link that breaks tells it the
replica's reports stopped (``lost``). ``connect`` opens the link before any request, so that a replica's
snapshot is in the index by the time requests come.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import math
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol

import grpc
from opentelemetry import propagate, trace
from prometheus_client import Counter

from inferplane.common import wire
from inferplane.common.errors import DeadlineExceeded
from inferplane.v1 import executor_pb2, executor_pb2_grpc

log = logging.getLogger(__name__)

Message = executor_pb2.ExecutorGenerateResponse

FRAMES = Counter("inferplane_router_channel_frames", "Frames received on executor channels")
TOKENS = Counter("inferplane_router_channel_tokens", "Token ids received on executor channels")
LATE = Counter("inferplane_router_channel_late_events",
               "Events for sequences the router no longer waits for (ended, cancelled, or of a broken channel)")
BREAKS = Counter("inferplane_router_channel_breaks", "Executor channels that broke, by cause", ["cause"])
BLOCK_REPORTS = Counter("inferplane_router_channel_block_reports",
                        "Prefix-cache block reports received on executor channels (snapshot or change)", ["kind"])
FORGOTTEN = Counter("inferplane_router_channel_forgotten_cancelled",
                    "Sequences a heartbeat listed that the router had no record of (a lost cancel): cancelled again")

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_MAX_TIMEOUT_MS = 2**32 - 1


class BlockListener(Protocol):
    """Where a channel's block reports go (``prefix_index.PrefixIndex``)."""

    def apply(self, model: str, address: str, reset: bool, stored: Sequence[int],
              removed: Sequence[int]) -> None: ...

    def lost(self, address: str) -> None: ...


def status_error(code: grpc.StatusCode, message: str, reason: wire.Reason = wire.REASON_UNSPECIFIED,
                 param: str = "") -> grpc.aio.AioRpcError:
    """The ``AioRpcError`` a call failing with this status would raise, ErrorInfo detail and param included."""
    status = wire.error_status(code, message, reason or wire.reason_for_status(code), param=param or None)
    trailers: list[tuple[str, str | bytes]] = [(wire.STATUS_DETAILS, status.SerializeToString())]
    if param:
        trailers.append((wire.PARAM, param))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), message, None)


def failure_error(failure: executor_pb2.SequenceFailure) -> grpc.aio.AioRpcError:
    return status_error(_CODES.get(failure.code, grpc.StatusCode.UNKNOWN), failure.message, failure.reason,
                        failure.param)


def sampled_traceparent() -> str:
    """The current span's W3C traceparent when it is sampled; empty otherwise (nothing to join)."""
    ctx = trace.get_current_span().get_span_context()
    if not (ctx.is_valid and ctx.trace_flags.sampled):
        return ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


class ChannelSequence:
    """One request's generation on a channel. The link's reader fills its buffer (``push``, ``finish``,
    ``fail``: never an await); the engine reads it with ``async for`` inside ``async with``."""

    def __init__(self, link: _Link, seq: int, end_at: float, interval: int = 1, *, logprobs: bool = True) -> None:
        self._link = link
        self.seq = seq
        # whether its messages carry the frames' logprobs (an executor that does not know ``omit_logprobs`` sends
        # them anyway: they are dropped here, not carried per token to a caller that never reads them)
        self.logprobs = logprobs
        # The request's stream_interval: after the first message, each holds at least this many ids (the last: what
        # is left), as the executor's Generate groups them; 1: whatever has arrived.
        self._want = 1
        self._interval = max(1, interval)
        self._ids: list[int] = []
        self._logprobs: list[float] = []  # of _ids, when the frames carry them
        self._top_ids: list[int] = []  # top_k per id of _ids, when asked
        self._top_logprobs: list[float] = []
        self._final: executor_pb2.SequenceEnd | None = None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.ended = False  # the executor ended it (finished or failed) or the channel broke
        self.finished = False  # the final message was handed to the reader
        self._consumed = False
        # One timer for the deadline (not one per wait: a wait per token would arm and cancel one per token).
        self._expired = False
        self._deadline = link.loop.call_at(end_at, self._expire)

    # --- from the link's reader ------------------------------------------------------------------------

    def push(self, token_ids: Sequence[int], logprobs: Sequence[float] = (), top_ids: Sequence[int] = (),
             top_logprobs: Sequence[float] = ()) -> None:
        self._ids.extend(token_ids)  # merged with what the consumer has not taken yet
        self._logprobs.extend(logprobs)
        self._top_ids.extend(top_ids)
        self._top_logprobs.extend(top_logprobs)
        self._wake()

    def finish(self, end: executor_pb2.SequenceEnd) -> None:
        self._final = end
        self.ended = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _expire(self) -> None:
        self._expired = True
        self._wake()

    # --- for the engine --------------------------------------------------------------------------------

    async def first(self) -> None:
        """Wait for the first event; a failure without tokens is raised here (``ReplicaSet.open`` may retry)."""
        while not (self._ids or self.ended):
            await self._wait()
        if self._error is not None and not self._ids:
            raise self._error

    async def _wait(self) -> None:
        """Until the reader brings something; past the request's deadline, ``DeadlineExceeded``."""
        if not self._expired:
            self._waiter = self._link.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._expired:
            raise DeadlineExceeded("deadline exceeded while waiting for the executor")

    def __aiter__(self) -> ChannelSequence:
        return self

    async def __anext__(self) -> Message:
        if self._consumed:
            raise StopAsyncIteration
        while not (len(self._ids) >= self._want or self.ended):
            await self._wait()
        if self._ids:
            if self._logprobs or self._top_ids:
                msg = Message(token_ids=self._ids, logprobs=self._logprobs, top_token_ids=self._top_ids,
                              top_logprobs=self._top_logprobs)
                self._logprobs, self._top_ids, self._top_logprobs = [], [], []
            else:  # the common case: ids only (empty lists still cost their conversion)
                msg = Message(token_ids=self._ids)
            self._ids = []
        else:
            msg = Message()
        self._want = self._interval
        if self._final is not None:
            msg.finish_reason = self._final.finish_reason
            msg.usage.CopyFrom(self._final.usage)
            self.finished = self._consumed = True
        elif self._error is not None and not msg.token_ids:
            self._consumed = True
            raise self._error
        return msg

    async def __aenter__(self) -> ChannelSequence:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Leave the sequence: cancelled on the executor unless it ended. Synchronous: nothing to lose at an
        await on the way out."""
        self._deadline.cancel()
        if not self.ended:
            self.ended = True
            self._link.cancel(self.seq)


class _Link:
    """One ``Channel`` call: its writer, reader and watchdog, and the sequences live on it."""

    def __init__(self, address: str, stub: executor_pb2_grpc.ExecutorServiceStub, silence_s: float,
                 blocks: BlockListener | None = None) -> None:
        self.address = address
        self._blocks = blocks
        self._silence_s = silence_s
        self.loop = asyncio.get_running_loop()
        self.sequences: dict[int, ChannelSequence] = {}
        self._cancelling: set[int] = set()  # cancelled here, their end not seen yet
        self._opens: list[executor_pb2.SequenceOpen] = []
        self._cancels: list[int] = []
        self._pending = asyncio.Event()
        self.broken: BaseException | None = None
        self.last_heard = self.loop.time()
        # Opened by whichever request comes first, but no request's: its call and tasks run in a context of their
        # own (no trace span or log field of that request on the channel's lifetime).
        clean = contextvars.Context()
        self._call = clean.run(stub.Channel)
        self._tasks = [asyncio.create_task(coro, context=clean) for coro in (self._write(), self._read(),
                                                                             self._watch())]

    # --- up ----------------------------------------------------------------------------------------------

    def open(self, seq: int, request: executor_pb2.ExecutorGenerateRequest, timeout: float,
             traceparent: str) -> ChannelSequence:
        sequence = self.sequences[seq] = ChannelSequence(self, seq, self.loop.time() + timeout,
                                                         request.stream_interval,
                                                         logprobs=not request.omit_logprobs)
        self._opens.append(executor_pb2.SequenceOpen(seq=seq, request=request, traceparent=traceparent,
                                                     timeout_ms=min(_MAX_TIMEOUT_MS, math.ceil(timeout * 1000))))
        self._pending.set()
        return sequence

    def cancel(self, seq: int) -> None:
        if self.sequences.pop(seq, None) is not None and self.broken is None:
            self._cancelling.add(seq)
            self._cancels.append(seq)
            self._pending.set()

    async def _write(self) -> None:
        """Everything queued since the last write goes out as one request (one per loop iteration at most)."""
        try:
            while True:
                await self._pending.wait()
                self._pending.clear()
                req = executor_pb2.ChannelRequest(opens=self._opens, cancels=self._cancels)
                self._opens, self._cancels = [], []
                await self._call.write(req)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self.break_("error", f"cannot write: {type(exc).__name__}")

    # --- down --------------------------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                frame = await self._call.read()
                if frame is grpc.aio.EOF:  # type: ignore[attr-defined]
                    self.break_("ended", "the executor ended the channel (draining)")
                    return
                self.last_heard = self.loop.time()
                self.dispatch(frame)
        except grpc.aio.AioRpcError as exc:
            self.break_("error", f"{exc.code().name}: {exc.details()}")
        except Exception as exc:  # a frame this router cannot read: nothing more on this stream can be trusted
            log.exception("channel to executor %s: unreadable frame", self.address)
            self.break_("error", f"unreadable frame ({type(exc).__name__})")

    def dispatch(self, frame: executor_pb2.ChannelFrame) -> None:
        """Hand a frame's news on: its block reports to the index, then to its sequences their tokens, then ends and
        failures. Never awaits."""
        FRAMES.inc()
        if self._blocks is not None:
            for report in frame.blocks:
                BLOCK_REPORTS.labels("snapshot" if report.reset else "change").inc()
                self._blocks.apply(report.model, self.address, report.reset, report.stored, report.removed)
        ids = frame.token_ids
        TOKENS.inc(len(ids))
        lps = frame.logprobs
        tops = frame.top_counts or itertools.repeat(0)
        at = top_at = 0
        for seq, count, k in zip(frame.seq, frame.count, tops, strict=False):  # tops: as long as seq, or endless
            sequence = self.sequences.get(seq)
            if sequence is not None:
                if not lps or not sequence.logprobs:
                    sequence.push(ids[at:at + count])
                else:
                    top_end = top_at + count * k
                    sequence.push(ids[at:at + count], lps[at:at + count], frame.top_token_ids[top_at:top_end],
                                  frame.top_logprobs[top_at:top_end])
            else:
                LATE.inc()
            at += count
            top_at += count * k
        for end in frame.ended:
            if (sequence := self._ended(end.seq)) is not None:
                sequence.finish(end)
        for failure in frame.failed:
            if (sequence := self._ended(failure.seq)) is not None:
                sequence.fail(failure_error(failure))
        if frame.HasField("heartbeat"):
            for seq in frame.heartbeat.active:
                if seq not in self.sequences and seq not in self._cancelling:
                    FORGOTTEN.inc()
                    self._cancelling.add(seq)
                    self._cancels.append(seq)
                    self._pending.set()

    def _ended(self, seq: int) -> ChannelSequence | None:
        sequence = self.sequences.pop(seq, None)
        if sequence is None and seq in self._cancelling:
            self._cancelling.discard(seq)  # the end of a cancel: expected
            if seq in self._cancels:  # it ended before its cancel went out: nothing left to cancel
                self._cancels.remove(seq)
        elif sequence is None:
            LATE.inc()
        return sequence

    async def _watch(self) -> None:
        """A channel with live sequences that stays silent (no frame, no heartbeat) is treated as broken."""
        while True:
            await asyncio.sleep(min(1.0, self._silence_s / 4))
            silent = self.loop.time() - self.last_heard
            if self.sequences and silent > self._silence_s:
                self.break_("silent", f"the executor sent nothing for {silent:.1f}s")
                return

    # --- the end -----------------------------------------------------------------------------------------

    def break_(self, cause: str, why: str) -> None:
        """Fail every live sequence with UNAVAILABLE (retried elsewhere when it had no token yet) and end the
        call. Later opens go to a new link."""
        if self.broken is not None:
            return
        BREAKS.labels(cause).inc()
        self.broken = status_error(grpc.StatusCode.UNAVAILABLE, f"channel to executor {self.address}: {why}")
        if self.sequences and cause != "closed":
            log.warning("channel to executor %s broke with %d live sequences: %s", self.address,
                        len(self.sequences), why)
        for sequence in self.sequences.values():
            sequence.fail(self.broken)
        self.sequences.clear()
        self._cancelling.clear()
        if self._blocks is not None:
            self._blocks.lost(self.address)
        self._call.cancel()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    async def close(self) -> None:
        self.break_("closed", "the router is closing")
        await asyncio.gather(*self._tasks, return_exceptions=True)


class ExecutorChannel:
    """The channel to one executor replica: sequences numbered here, on the current link (reopened lazily)."""

    def __init__(self, address: str, channel: grpc.aio.Channel, *, silence_s: float = 20.0,
                 blocks: BlockListener | None = None) -> None:
        self.address = address
        self._blocks = blocks
        self._channel = channel
        self._stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        self._silence_s = silence_s
        self._seqs = itertools.count(1)
        self._link: _Link | None = None

    @property
    def live(self) -> int:
        return len(self._link.sequences) if self._link is not None and self._link.broken is None else 0

    async def open(self, request: executor_pb2.ExecutorGenerateRequest, *, timeout: float,
                   traceparent: str = "") -> ChannelSequence:
        """Start ``request`` as a sequence and wait for its first event (bounded by ``timeout``)."""
        link = self.connect()
        sequence = link.open(next(self._seqs), request, timeout, traceparent)
        try:
            await sequence.first()
        except BaseException:
            sequence.close()
            raise
        return sequence

    def connect(self) -> _Link:
        """The current link, opened now if there is none (or it broke)."""
        link = self._link
        if link is None or link.broken is not None:
            link = self._link = _Link(self.address, self._stub, self._silence_s, self._blocks)
        return link

    async def close(self) -> None:
        if self._link is not None:
            await self._link.close()
        await self._channel.close(None)
