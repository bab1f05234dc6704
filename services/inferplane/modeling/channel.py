"""Channel (step) mode of the decoupled token models: many sequences on one Triton stream, one frame per IPC round.

The requests and frame columns are ``contract.LLMChannel``'s. A model (the LLM, the benchmarks' fast model) keeps
one ``ChannelHub`` and:
- in ``execute`` (Triton's thread), hands every request with a ``channel`` input to ``hub.handle(request, channel,
  start)``: an attach registers the channel, a cancel calls the model's ``on_cancel(key)`` for each of its live
  sequences, an open calls ``start(request, key)``, which parses the generation and enqueues it (a ``ValueError``
  from it becomes a failed sequence, INVALID_ARG, in the channel's next frame);
- reports each sequence's news with ``tokens`` / ``finished`` / ``failed`` (from any thread; they only record);
- with a prefix cache (``publishes_blocks``), reports the blocks its cache gained and lost with ``blocks`` (any
  thread): the hub keeps the set the cache holds and gives each channel its changes in its next frame, and a new
  attach (or a ``reset``) the whole set, so that the client always knows exactly which blocks the instance holds;
- calls ``flush()`` on its one IPC thread once per round: it ends the open and cancel requests handled since the
  last round (empty final responses), sends every channel with news ONE response carrying all its sequences, and
  asks each attach ``is_cancelled()`` at most every ``CANCEL_POLL_S``; a cancelled attach, or one whose send
  fails (the client went away), drops its channel and cancels its live sequences through ``on_cancel``.
Every ``pb_utils`` call after ``initialize`` is made in ``flush`` and ``close``, so the model's rule (one thread
makes them all: the stub's IPC deadlocked on two) holds. ``ResponseCounter`` is the hop counter both modes count
into (Triton custom metric ``LLMChannel.RESPONSES_METRIC``), published at most once a second.

If Triton ran several instances of a model, an open could reach an instance that does not hold its channel: it
is refused with UNAVAILABLE ("unknown channel"); the executor uses this mode only for single-instance models.

Imports no Triton (this package imports only torch, numpy, safetensors and the standard library): the model
passes its ``triton_python_backend_utils`` module in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inferplane.modeling.blocks import BlockChanges
from inferplane.modeling.contract import INVALID_ARG, LLM, UNAVAILABLE, LLMChannel

CANCEL_POLL_S = 0.05  # each attach is asked is_cancelled() at most this often
PUBLISH_EVERY_S = 1.0  # the response counter is published at most this often (each set is an IPC)

_INT64, _UINT64, _INT32, _FP32 = np.dtype("<i8"), np.dtype("<u8"), np.dtype("<i4"), np.dtype("<f4")
assert np.dtype(LLM.TOKEN_IDS.numpy_dtype) == _INT64 and np.dtype(LLM.LOGPROBS.numpy_dtype) == _FP32
assert np.dtype(LLMChannel.COUNTS.numpy_dtype) == _INT32 == np.dtype(LLMChannel.ENDED_PROMPT_TOKENS.numpy_dtype)
assert np.dtype(LLMChannel.BLOCKS_STORED.numpy_dtype) == _UINT64 == np.dtype(LLMChannel.BLOCKS_REMOVED.numpy_dtype)


@dataclass(frozen=True, slots=True)
class SeqKey:
    """A channel sequence's id inside the model (the scheduler's request id); per-request ids are ints."""

    channel: str
    seq: int


class ChannelError(ValueError):
    """An open or cancel the channel cannot take: answered with its own TritonError (``code``)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class _News:
    """What one sequence has to report in the next frame."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_k: int = 0  # alternatives per token in top_ids / top_logprobs
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    end: tuple[str, int, int, int] | None = None  # (reason, prompt_tokens, completion_tokens, cached_tokens)
    fail: tuple[str, str] | None = None  # (TritonError code, message)


@dataclass(slots=True)
class _Channel:
    name: str
    request: Any  # the attach request (is_cancelled)
    sender: Any  # the attach's response sender: the frames
    live: set[int] = field(default_factory=set)  # sequences opened and not yet ended or failed
    news: dict[int, _News] = field(default_factory=dict)
    polled: float = 0.0
    blocks: BlockChanges = field(default_factory=BlockChanges)  # the prefix cache's, for the next frame

    def has_news(self) -> bool:
        return bool(self.news or self.blocks)


class ResponseCounter:
    """Responses sent, per mode ("request": one per token response and final; "channel": one per frame), as the
    Triton counter ``LLMChannel.RESPONSES_METRIC{model, mode}``. ``count`` and ``publish`` run on the IPC thread."""

    def __init__(self, pb_utils: Any, model: str) -> None:
        self._family = pb_utils.MetricFamily(name=LLMChannel.RESPONSES_METRIC, kind=pb_utils.MetricFamily.COUNTER,
                                             description="Responses the model sent (one per message on the token path)")
        self._metrics = {mode: self._family.Metric(labels={"model": model, "mode": mode}) for mode in LLMChannel.MODES}
        self._pending = dict.fromkeys(LLMChannel.MODES, 0)
        self._published = 0.0

    def count(self, mode: str, n: int = 1) -> None:
        self._pending[mode] += n

    def publish(self, now: float, *, force: bool = False) -> None:
        if not force and now - self._published < PUBLISH_EVERY_S:
            return
        self._published = now
        for mode, n in self._pending.items():
            if n:
                self._metrics[mode].increment(float(n))
                self._pending[mode] = 0


def _bytes(values: list[str]) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=np.object_)


class ChannelHub:
    """The channels of one model instance (see the module docstring for who calls what, on which thread)."""

    def __init__(self, pb_utils: Any, counter: ResponseCounter, on_cancel: Callable[[SeqKey], None],
                 notify: Callable[[], None] = lambda: None, *, publishes_blocks: bool = False) -> None:
        self._pb = pb_utils
        self._counter = counter
        self._on_cancel = on_cancel  # stops a sequence in the engine (from execute's or the IPC thread)
        self._notify = notify  # wakes the IPC thread when execute recorded something for it to send
        self._lock = threading.Lock()
        self._channels: dict[str, _Channel] = {}
        self._completions: list[tuple[Any, ChannelError | None]] = []  # open/cancel senders to end, with an error
        self._publishes_blocks = publishes_blocks
        self._held: set[int] = set()  # the prefix cache's blocks, as ``blocks`` reported them

    @staticmethod
    def channel_of(pb_utils: Any, request: Any) -> str | None:
        """The request's channel id, or None for a per-request generation."""
        tensor = pb_utils.get_input_tensor_by_name(request, LLMChannel.CHANNEL.name)
        if tensor is None:
            return None
        values = tensor.as_numpy().reshape(-1)
        if values.size != 1:
            raise ChannelError(f"{LLMChannel.CHANNEL.name} must hold one id, got {values.size}", INVALID_ARG)
        value = values[0]
        return value.decode() if isinstance(value, bytes) else str(value)

    # ------------------------------------------------------------------ Triton's thread (execute)

    def handle(self, request: Any, channel: str, start: Callable[[Any, SeqKey], None]) -> None:
        """An attach, open or cancel of ``channel`` (told by its inputs); ``start`` parses and enqueues an open."""
        sender = request.get_response_sender()
        seq_tensor = self._pb.get_input_tensor_by_name(request, LLMChannel.SEQ.name)
        cancel_tensor = self._pb.get_input_tensor_by_name(request, LLMChannel.CANCEL.name)
        error: ChannelError | None = None
        try:
            if cancel_tensor is not None:
                self._cancel(channel, cancel_tensor.as_numpy().reshape(-1).tolist())
            elif seq_tensor is not None:
                seq = seq_tensor.as_numpy().reshape(-1)
                if seq.size != 1:
                    raise ChannelError(f"{LLMChannel.SEQ.name} must hold one value, got {seq.size}", INVALID_ARG)
                self._open(request, SeqKey(channel, int(seq[0])), start)
            else:
                self._attach(channel, request, sender)
                return  # the attach stays open: its responses are the frames
        except ChannelError as e:
            error = e
        with self._lock:
            self._completions.append((sender, error))
        self._notify()

    def _attach(self, name: str, request: Any, sender: Any) -> None:
        with self._lock:
            if name in self._channels:
                raise ChannelError(f"channel {name!r} is already attached", INVALID_ARG)
            channel = self._channels[name] = _Channel(name, request, sender)
            if self._publishes_blocks:  # the first frame tells the whole set
                channel.blocks.snapshot(self._held)

    def _open(self, request: Any, key: SeqKey, start: Callable[[Any, SeqKey], None]) -> None:
        with self._lock:
            channel = self._channels.get(key.channel)
            if channel is None:
                raise ChannelError(f"unknown channel {key.channel!r} (not attached to this model instance)",
                                   UNAVAILABLE)
            if key.seq in channel.live:
                raise ChannelError(f"sequence {key.seq} of channel {key.channel!r} is live", INVALID_ARG)
            channel.live.add(key.seq)
        try:
            start(request, key)
        except ValueError as e:  # the generation is refused: a failed sequence in the next frame
            self.failed(key, INVALID_ARG, str(e))

    def _cancel(self, name: str, seqs: list[int]) -> None:
        with self._lock:
            channel = self._channels.get(name)
            if channel is None:
                raise ChannelError(f"unknown channel {name!r} (not attached to this model instance)", UNAVAILABLE)
            live = [SeqKey(name, seq) for seq in seqs if seq in channel.live]
        for key in live:
            self._on_cancel(key)

    # ------------------------------------------------------------------ any thread: record news

    def _news(self, key: SeqKey) -> _News | None:
        channel = self._channels.get(key.channel)
        if channel is None:  # dropped (the client left): nobody to tell
            return None
        news = channel.news.get(key.seq)
        if news is None:
            news = channel.news[key.seq] = _News()
        return news

    def tokens(self, key: SeqKey, ids: list[int], logprobs: list[float], top_k: int = 0,
               top_ids: list[int] | None = None, top_logprobs: list[float] | None = None) -> None:
        """New tokens; with ``top_k``, ``top_k`` alternatives per token in ``top_ids``/``top_logprobs``."""
        with self._lock:
            news = self._news(key)
            if news is not None:
                news.ids += ids
                news.logprobs += logprobs
                if top_k:
                    news.top_k = top_k
                    news.top_ids += top_ids or []
                    news.top_logprobs += top_logprobs or []

    def finished(self, key: SeqKey, reason: str, prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int = 0) -> None:
        with self._lock:
            news = self._news(key)
            if news is not None:
                news.end = (reason, prompt_tokens, completion_tokens, cached_tokens)
                self._channels[key.channel].live.discard(key.seq)

    def failed(self, key: SeqKey, code: str, message: str) -> None:
        with self._lock:
            news = self._news(key)
            if news is not None:
                news.fail = (code, message)
                self._channels[key.channel].live.discard(key.seq)
        self._notify()

    def blocks(self, stored: list[int], removed: list[int], *, reset: bool = False) -> None:
        """The prefix cache gained ``stored`` and lost ``removed`` (disjoint); with ``reset``, it holds exactly
        ``stored`` (a new, empty cache: ``reset`` with nothing stored). A no-op unless ``publishes_blocks``."""
        if not self._publishes_blocks:
            return
        with self._lock:
            if reset:
                self._held = set(stored)
                for channel in self._channels.values():
                    channel.blocks.snapshot(self._held)
                return
            self._held.difference_update(removed)
            self._held.update(stored)
            for channel in self._channels.values():
                channel.blocks.change(stored, removed)

    def live_keys(self) -> list[SeqKey]:
        with self._lock:
            return [SeqKey(c.name, seq) for c in self._channels.values() for seq in c.live]

    # ------------------------------------------------------------------ the IPC thread

    def flush(self) -> None:
        """Send what was recorded: the completions, one frame per channel with news; then poll the attaches."""
        with self._lock:
            completions, self._completions = self._completions, []
            frames = []
            for channel in self._channels.values():
                if channel.has_news():
                    frames.append((channel, channel.news, channel.blocks.take()))
                    channel.news = {}
        final = self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for sender, error in completions:
            response = None if error is None else self._pb.InferenceResponse(
                error=self._pb.TritonError(str(error), getattr(self._pb.TritonError, error.code)))
            try:
                sender.send(response, flags=final)
            except Exception:  # the client has gone: its attach's poll or send ends the channel
                pass
        for channel, news, blocks in frames:
            try:
                channel.sender.send(self._frame(news, *blocks))
            except Exception:  # the client went away between two polls
                self._drop(channel)
                continue
            self._counter.count("channel")
        now = time.monotonic()
        for channel in list(self._channels.values()):
            if now - channel.polled >= CANCEL_POLL_S:
                channel.polled = now
                if channel.request.is_cancelled():
                    self._drop(channel)

    def _frame(self, news: dict[int, _News], reset: bool, stored: list[int], removed: list[int]) -> Any:
        """One response with the columns of ``LLMChannel.OUTPUTS`` (a group only when it has rows)."""
        seqs, counts, ids, logprobs = [], [], [], []
        top_counts, top_ids, top_logprobs = [], [], []
        ended, reasons, prompts, completions, cached = [], [], [], [], []
        failed, codes, messages = [], [], []
        for seq, item in news.items():
            if item.ids:
                seqs.append(seq)
                counts.append(len(item.ids))
                ids += item.ids
                logprobs += item.logprobs
                top_counts.append(item.top_k)
                top_ids += item.top_ids
                top_logprobs += item.top_logprobs
            if item.fail is not None:
                failed.append(seq)
                codes.append(item.fail[0])
                messages.append(item.fail[1])
            elif item.end is not None:
                ended.append(seq)
                reasons.append(item.end[0])
                prompts.append(item.end[1])
                completions.append(item.end[2])
                cached.append(item.end[3])
        tensor, out = self._pb.Tensor, []
        if seqs:
            out += [tensor(LLMChannel.SEQS.name, np.array(seqs, dtype=_INT64)),
                    tensor(LLMChannel.COUNTS.name, np.array(counts, dtype=_INT32)),
                    tensor(LLM.TOKEN_IDS.name, np.array(ids, dtype=_INT64)),
                    tensor(LLM.LOGPROBS.name, np.array(logprobs, dtype=_FP32))]
            if top_ids:
                out += [tensor(LLMChannel.TOP_COUNTS.name, np.array(top_counts, dtype=_INT32)),
                        tensor(LLM.TOP_TOKEN_IDS.name, np.array(top_ids, dtype=_INT64)),
                        tensor(LLM.TOP_LOGPROB_VALUES.name, np.array(top_logprobs, dtype=_FP32))]
        if ended:
            out += [tensor(LLMChannel.ENDED.name, np.array(ended, dtype=_INT64)),
                    tensor(LLMChannel.ENDED_REASONS.name, _bytes(reasons)),
                    tensor(LLMChannel.ENDED_PROMPT_TOKENS.name, np.array(prompts, dtype=_INT32)),
                    tensor(LLMChannel.ENDED_COMPLETION_TOKENS.name, np.array(completions, dtype=_INT32)),
                    tensor(LLMChannel.ENDED_CACHED_TOKENS.name, np.array(cached, dtype=_INT32))]
        if failed:
            out += [tensor(LLMChannel.FAILED.name, np.array(failed, dtype=_INT64)),
                    tensor(LLMChannel.FAILED_CODES.name, _bytes(codes)),
                    tensor(LLMChannel.FAILED_MESSAGES.name, _bytes(messages))]
        if reset:
            out.append(tensor(LLMChannel.BLOCKS_RESET.name, np.ones(1, dtype=_INT32)))
        if stored or reset:
            out.append(tensor(LLMChannel.BLOCKS_STORED.name, np.array(stored, dtype=_UINT64)))
        if removed:
            out.append(tensor(LLMChannel.BLOCKS_REMOVED.name, np.array(removed, dtype=_UINT64)))
        return self._pb.InferenceResponse(output_tensors=out)

    def _drop(self, channel: _Channel) -> None:
        """The client left (cancelled attach, failed send): stop the channel's sequences and end the attach."""
        with self._lock:
            if self._channels.get(channel.name) is not channel:
                return
            del self._channels[channel.name]
            live = [SeqKey(channel.name, seq) for seq in channel.live]
        for key in live:
            self._on_cancel(key)
        try:
            channel.sender.send(flags=self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # already gone
            pass

    def close(self) -> None:
        """At finalize, after the last frames: end every attach (the client sees its stream's channel end)."""
        self.flush()
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            try:
                channel.sender.send(flags=self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception:
                pass
