"""The step backend: every sequence of a model on ONE Triton ``ModelStreamInfer`` stream, one frame per model round.

``TritonStepBackend(url, fallback=None)`` implements ``executor.backend.GenerationBackend`` on the channel mode of
the token models (``contract.LLMChannel``; the model side is ``inferplane.modeling.channel``):
- a model's stream is opened lazily, on its first ``open``: ``ModelConfig`` says whether the model speaks the
  channel mode (a ``channel`` input) with exactly one instance; with more, an open could reach an instance that
  does not hold the channel, so such a model (and one without the mode) goes to ``fallback``, the per-request
  backend (without one, its sequences fail with ``Unavailable``). An unknown model fails with ``NotFound``.
- the stream carries one attach (channel id: a uuid4), then the opens (one Triton request each, sequence numbers
  counting from 0) and batched cancels, written by one writer task in the order they were asked for;
- its reader parses each frame once (columns, no tritonclient ``InferResult``) and calls the sinks of every
  sequence in it in one go, with no ``await`` between them: tokens first, then ends and failures;
- a failed sequence carries the model's TritonError code (``triton_error``: INVALID_ARG -> ``InvalidArgument``,
  anything else -> ``Unavailable``); an open Triton itself refused (an error message on the stream naming the
  open) fails that sequence with ``Unavailable``;
- a broken stream (an error status, its end, the model ending the attach, an error naming no open) fails every
  live sequence on it with ``Unavailable``; the next ``open`` of that model opens a new stream and channel.
A model with a prefix cache also reports the blocks its cache gains and loses (``BLOCKS_*`` columns: a snapshot
on attach, changes after); they go to ``on_blocks(model, reset, stored, removed)`` (the executor's ``BlockBook``),
taken only from the model's newest stream (a retired one still finishing its sequences repeats them; the newest one
started with a snapshot). A broken newest stream reports the model's cache empty: Triton, or the model, may have
restarted, and a new stream's snapshot tells what it holds.
Cancelling one sequence is in-band (a cancel request naming it): cancelling the gRPC call would cancel them all.
The stream is opened WITHOUT ``contract.STREAM_ERRORS_AS_STATUS``, so that one request's error does not end it.
Tracing: an open carries the caller's ``traceparent`` (request parameter ``LLMChannel.TRACEPARENT``) only when
its span is sampled.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from opentelemetry import propagate, trace
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inferplane.common.errors import InferplaneError, Unavailable
from inferplane.common.tasks import spawn
from inferplane.executor.backend import GenerationBackend, SequenceSink
from inferplane.executor.triton_client import GenerateParams, build_request, triton_error
from inferplane.modeling.contract import INTERNAL, INVALID_ARG, LLM, UNAVAILABLE, LLMChannel

log = logging.getLogger(__name__)

ATTACH_ID = "attach"  # the attach request's id: its responses (the frames) carry it
# the models' TritonError code names -> the gRPC status of the same meaning (triton_error maps those)
_STATUS = {INVALID_ARG: grpc.StatusCode.INVALID_ARGUMENT, INTERNAL: grpc.StatusCode.INTERNAL,
           UNAVAILABLE: grpc.StatusCode.UNAVAILABLE}
_SEQS, _COUNTS, _TOKEN_IDS, _LOGPROBS = (LLMChannel.SEQS.name, LLMChannel.COUNTS.name, LLM.TOKEN_IDS.name,
                                         LLM.LOGPROBS.name)
_TOP_COUNTS, _TOP_IDS, _TOP_VALUES = (LLMChannel.TOP_COUNTS.name, LLM.TOP_TOKEN_IDS.name,
                                     LLM.TOP_LOGPROB_VALUES.name)
_ENDED, _REASONS = LLMChannel.ENDED.name, LLMChannel.ENDED_REASONS.name
_PROMPTS, _COMPLETIONS = LLMChannel.ENDED_PROMPT_TOKENS.name, LLMChannel.ENDED_COMPLETION_TOKENS.name
_CACHED = LLMChannel.ENDED_CACHED_TOKENS.name  # absent from a model that predates it (or has no prefix cache)
_FAILED, _CODES, _MESSAGES = LLMChannel.FAILED.name, LLMChannel.FAILED_CODES.name, LLMChannel.FAILED_MESSAGES.name
_STORED, _REMOVED, _RESET = (LLMChannel.BLOCKS_STORED.name, LLMChannel.BLOCKS_REMOVED.name,
                             LLMChannel.BLOCKS_RESET.name)
_I64, _U64, _I32, _F32 = np.dtype("<i8"), np.dtype("<u8"), np.dtype("<i4"), np.dtype("<f4")
assert LLMChannel.SEQS.numpy_dtype == LLM.TOKEN_IDS.numpy_dtype == "<i8" and LLM.LOGPROBS.numpy_dtype == "<f4"
assert LLMChannel.COUNTS.numpy_dtype == LLMChannel.ENDED_PROMPT_TOKENS.numpy_dtype == "<i4"
assert LLMChannel.BLOCKS_STORED.numpy_dtype == LLMChannel.BLOCKS_REMOVED.numpy_dtype == "<u8"

# model, reset, stored, removed: a model's prefix-cache change (``executor.block_book.BlockBook.apply``)
BlocksCallback = Callable[[str, bool, Sequence[int], Sequence[int]], None]


def _bytes_tensor(values: list[str]) -> bytes:
    """KServe BYTES raw contents: per item a 4-byte little-endian length, then the bytes."""
    out = bytearray()
    for value in values:
        data = value.encode()
        out += len(data).to_bytes(4, "little") + data
    return bytes(out)


def _strings(raw: bytes) -> list[str]:
    values, at = [], 0
    while at < len(raw):
        size = int.from_bytes(raw[at:at + 4], "little")
        values.append(raw[at + 4:at + 4 + size].decode())
        at += 4 + size
    return values


def _add_input(req: service_pb2.ModelInferRequest, name: str, datatype: str, shape: list[int], raw: bytes) -> None:
    tensor = req.inputs.add()
    tensor.name, tensor.datatype = name, datatype
    tensor.shape.extend(shape)
    req.raw_input_contents.append(raw)


@dataclass(slots=True)
class _Seq:
    """One live sequence of a model stream: what its sink needs, and what a hand-over to the fallback needs."""

    key: Hashable
    sink: SequenceSink
    params: GenerateParams
    request_id: str
    request: service_pb2.ModelInferRequest


class _ModelStream:
    """One model's stream and channel: the writer task (attach, opens, cancels) and the reader (frames)."""

    def __init__(self, backend: TritonStepBackend, model: str) -> None:
        self.backend, self.model = backend, model
        self.channel_id = uuid.uuid4().hex
        self._channel_raw = _bytes_tensor([self.channel_id])
        self.live: dict[int, _Seq] = {}
        self.seq_of: dict[Hashable, int] = {}
        self.next_seq = 0
        self.opens: list[service_pb2.ModelInferRequest] = []  # to write, in order
        self.cancels: list[int] = []  # to write as one cancel request, after the opens
        self.wake = asyncio.Event()
        self.broken = False
        self.retiring = False  # takes no more opens; ends with its last live sequence
        self.publishes_blocks = False  # the model reported its prefix-cache blocks on this stream
        self.call: Any = None
        self.reader: asyncio.Future[Any] | None = None
        self.writer = spawn(self._write())
        backend.streams_opened += 1
        backend._newest[model] = self

    # ------------------------------------------------------------------ the event loop's callers

    def open(self, key: Hashable, params: GenerateParams, request_id: str, sink: SequenceSink) -> None:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        if self.next_seq >= self.backend.sequences_per_stream and not self.retiring:
            # Retire this stream: the next open starts another, and this one ends once its sequences have.
            self.retiring = True
            self.backend._forget(self)
        req = build_request(self.model, params, str(seq))  # the id names the open in Triton's errors
        _add_input(req, LLMChannel.CHANNEL.name, LLMChannel.CHANNEL.datatype, [1], self._channel_raw)
        _add_input(req, LLMChannel.SEQ.name, LLMChannel.SEQ.datatype, [1], seq.to_bytes(8, "little", signed=True))
        if trace.get_current_span().get_span_context().trace_flags.sampled:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            if "traceparent" in carrier:
                req.parameters[LLMChannel.TRACEPARENT].string_param = carrier["traceparent"]
        self.live[seq] = _Seq(key, sink, params, request_id, req)
        self.seq_of[key] = seq
        self.opens.append(req)
        self.wake.set()

    def cancel(self, key: Hashable) -> None:
        seq = self.seq_of.get(key)
        if seq is not None:
            self.cancels.append(seq)
            self.wake.set()

    # ------------------------------------------------------------------ the writer task

    async def _write(self) -> None:
        try:
            if not await self._speaks_channel_mode() or self.broken:  # handed over, or failed (closed) meanwhile
                return
            self.call = self.backend._stub.ModelStreamInfer()
            self.call.add_done_callback(self._call_done)  # however it ends (a local cancel raises no error)
            self.reader = spawn(self._read(self.call))
            attach = service_pb2.ModelInferRequest(model_name=self.model, id=ATTACH_ID)
            _add_input(attach, LLMChannel.CHANNEL.name, LLMChannel.CHANNEL.datatype, [1], self._channel_raw)
            attach.parameters["triton_enable_empty_final_response"].bool_param = True  # see the attach end
            await self.call.write(attach)
            while not self.broken:
                await self.wake.wait()
                self.wake.clear()
                while self.opens:
                    opens, self.opens = self.opens, []
                    for req in opens:
                        await self.call.write(req)
                if self.cancels:
                    cancels, self.cancels = self.cancels, []
                    req = service_pb2.ModelInferRequest(model_name=self.model, id="cancel")
                    _add_input(req, LLMChannel.CHANNEL.name, LLMChannel.CHANNEL.datatype, [1], self._channel_raw)
                    _add_input(req, LLMChannel.CANCEL.name, LLMChannel.CANCEL.datatype, [len(cancels)],
                               np.asarray(cancels, dtype=_I64).tobytes())
                    await self.call.write(req)
        except grpc.aio.AioRpcError as exc:
            self.fail(Unavailable(f"triton: the stream of {self.model!r} broke: {exc.code().name}: {exc.details()}"))
        except Exception as exc:  # e.g. a write after the call ended (UsageError); a no-op when already failed
            if not self.broken:
                log.warning("the writer of %r failed", self.model, exc_info=True)
            self.fail(Unavailable(f"triton: the stream of {self.model!r} broke: {exc!r}"))

    async def _speaks_channel_mode(self) -> bool:
        """Whether this model gets the step path (asked once per model); if not, hand its sequences over."""
        backend = self.backend
        step = backend._step_models.get(self.model)
        if step is None:
            try:
                response = await backend._stub.ModelConfig(service_pb2.ModelConfigRequest(name=self.model), timeout=10)
            except grpc.aio.AioRpcError as exc:  # NOT_FOUND: an unknown model
                self.fail(triton_error(exc.code(), exc.details() or "", self.model))
                return False
            config = response.config
            instances = sum(max(group.count, 1) for group in config.instance_group) or 1
            step = LLMChannel.CHANNEL.name in {i.name for i in config.input} and instances == 1
            backend._step_models[self.model] = step
            log.info("model %r: %s", self.model, "step backend (one stream, one frame per round)" if step else
                     f"per-request contract ({instances} instances or no channel mode)")
        if not step:
            self._hand_over()
        return step

    def _hand_over(self) -> None:
        """This model is served per request: its sequences (and their cancels) go to the fallback backend."""
        self.broken = True
        self.backend._forget(self)
        live, self.live = self.live, {}
        cancelled = {live[seq].key for seq in self.cancels if seq in live}
        fallback = self.backend._fallback
        for entry in live.values():
            if fallback is None:
                entry.sink.failed(entry.key, Unavailable(
                    f"model {self.model!r} has no single-instance channel mode and this executor no per-request "
                    "backend"))
                continue
            fallback.open(entry.key, self.model, entry.params, entry.request_id, entry.sink)
            if entry.key in cancelled:
                fallback.cancel(entry.key)

    # ------------------------------------------------------------------ the reader task

    async def _read(self, call: Any) -> None:
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:  # type: ignore[attr-defined]
                    raise Unavailable(f"triton ended the stream of {self.model!r}")
                if msg.error_message:
                    self._on_error(msg.infer_response.id, msg.error_message)
                    continue
                response = msg.infer_response
                if response.id != ATTACH_ID:
                    continue
                if not response.outputs and response.parameters["triton_final_response"].bool_param:
                    raise Unavailable(f"model {self.model!r} ended the channel (unloaded?)")
                self._dispatch(response)
        except grpc.aio.AioRpcError as exc:
            self.fail(Unavailable(f"triton: the stream of {self.model!r} broke: {exc.code().name}: {exc.details()}"))
        except Unavailable as exc:
            self.fail(exc)
        except Exception as exc:  # a frame it could not parse (or a sink that raised): fail rather than hang
            log.exception("the reader of %r failed", self.model)
            self.fail(Unavailable(f"triton: could not read the stream of {self.model!r}: {exc!r}"))

    def _call_done(self, call: Any) -> None:
        if not self.broken:
            self.fail(Unavailable(f"triton: the stream of {self.model!r} ended"))

    def _on_error(self, request_id: str, message: str) -> None:
        """An error message on the stream: an open Triton or the model refused (that sequence), else the channel's."""
        seq = int(request_id) if request_id.isdigit() else None
        entry = self._end(seq) if seq is not None else None
        if entry is None:
            raise Unavailable(f"triton: the channel of {self.model!r} failed: {message}")
        entry.sink.failed(entry.key, Unavailable(f"triton refused the open: {message}"))

    def _dispatch(self, response: service_pb2.ModelInferResponse) -> None:
        """One frame to the sinks, in one go: every sequence's tokens, then the ends, then the failures."""
        cols = {out.name: raw for out, raw in zip(response.outputs, response.raw_output_contents, strict=False)}
        if _STORED in cols or _REMOVED in cols:
            self._blocks(_RESET in cols, cols.get(_STORED, b""), cols.get(_REMOVED, b""))
        live = self.live
        raw = cols.get(_SEQS)
        if raw is not None:
            ids = np.frombuffer(cols[_TOKEN_IDS], dtype=_I64).tolist()
            logprobs = np.frombuffer(cols[_LOGPROBS], dtype=_F32).tolist()
            counts = np.frombuffer(cols[_COUNTS], dtype=_I32).tolist()
            top_raw = cols.get(_TOP_COUNTS)
            tops = np.frombuffer(top_raw, dtype=_I32).tolist() if top_raw is not None else [0] * len(counts)
            top_ids = np.frombuffer(cols[_TOP_IDS], dtype=_I64).tolist() if top_raw is not None else []
            top_lps = np.frombuffer(cols[_TOP_VALUES], dtype=_F32).tolist() if top_raw is not None else []
            at = top_at = 0
            for seq, n, k in zip(np.frombuffer(raw, dtype=_I64).tolist(), counts, tops, strict=True):
                entry = live.get(seq)
                if entry is not None:
                    entry.sink.tokens(entry.key, ids[at:at + n], logprobs[at:at + n], k,
                                      top_ids[top_at:top_at + n * k], top_lps[top_at:top_at + n * k])
                at += n
                top_at += n * k
        raw = cols.get(_ENDED)
        if raw is not None:
            seqs = np.frombuffer(raw, dtype=_I64).tolist()
            cached_raw = cols.get(_CACHED)
            cached = np.frombuffer(cached_raw, dtype=_I32).tolist() if cached_raw is not None else [0] * len(seqs)
            for seq, reason, prompt, completion, reused in zip(
                    seqs, _strings(cols[_REASONS]), np.frombuffer(cols[_PROMPTS], dtype=_I32).tolist(),
                    np.frombuffer(cols[_COMPLETIONS], dtype=_I32).tolist(), cached, strict=True):
                entry = self._end(seq)
                if entry is not None:
                    entry.sink.finished(entry.key, reason, prompt, completion, reused)
        raw = cols.get(_FAILED)
        if raw is not None:
            for seq, code, message in zip(np.frombuffer(raw, dtype=_I64).tolist(), _strings(cols[_CODES]),
                                          _strings(cols[_MESSAGES]), strict=True):
                entry = self._end(seq)
                if entry is not None:
                    entry.sink.failed(entry.key, triton_error(_STATUS.get(code), message, self.model))

    def _blocks(self, reset: bool, stored: bytes, removed: bytes) -> None:
        self.publishes_blocks = True
        backend = self.backend
        if backend.on_blocks is not None and backend._newest.get(self.model) is self:
            backend.on_blocks(self.model, reset, np.frombuffer(stored, dtype=_U64).tolist(),
                              np.frombuffer(removed, dtype=_U64).tolist())

    def _end(self, seq: int) -> _Seq | None:
        entry = self.live.pop(seq, None)
        if entry is not None:
            del self.seq_of[entry.key]
            self.backend._where.pop(entry.key, None)
            if self.retiring and not self.live:
                loop = asyncio.get_running_loop()  # after this frame's other events have been dispatched
                loop.call_soon(self._retire)
        return entry

    def _retire(self) -> None:
        """A retired stream whose last sequence ended: close it (cancels the attach; nothing is live on it)."""
        if self.retiring and not self.live and not self.opens:
            self.fail(Unavailable("retired"))

    # ------------------------------------------------------------------ the end

    def fail(self, error: InferplaneError) -> None:
        """Fail every live sequence with ``error`` (in one go) and end the stream; the next open starts another."""
        if self.broken:
            return
        self.broken = True
        self.backend._forget(self)
        if self.backend._newest.get(self.model) is self:
            del self.backend._newest[self.model]
            if self.publishes_blocks and self.backend.on_blocks is not None and not self.retiring:
                self.backend.on_blocks(self.model, True, [], [])  # nothing known held until a new stream says
        live, self.live, self.seq_of = self.live, {}, {}
        if live:
            log.warning("%s: failing %d sequences of %r", error, len(live), self.model)
        for entry in live.values():
            self.backend._where.pop(entry.key, None)
            entry.sink.failed(entry.key, error)
        if self.call is not None:
            self.call.cancel()  # cancels the attach: the model cancels whatever it still runs for this channel
        self.wake.set()  # the writer sees `broken` and returns
        if self.reader is not None and self.reader is not asyncio.current_task():
            self.reader.cancel()


# A model's stream takes this many opens, then the next open starts a new stream and the old one ends with its last
# sequence. tritonserver keeps some memory for every request of a stream until the stream ends (measured: a 10-minute
# soak on one stream grew its RSS by ~3.4 KB per request, 64 -> 126 MB); recycling bounds it.
SEQUENCES_PER_STREAM = 1000


def _sampled() -> bool:
    return bool(trace.get_current_span().get_span_context().trace_flags.sampled)


class TritonStepBackend:
    """``GenerationBackend`` on the token models' channel mode: one Triton stream per model (module docstring).

    ``url``: Triton's gRPC address (host:port). ``fallback``: the per-request backend for a model that cannot take
    the step path (more than one instance, or no channel mode); this backend does not close it. ``on_blocks``: where
    the models' prefix-cache block reports go (module docstring).

    A sequence opened inside a *sampled* trace also goes to ``fallback`` when there is one: Triton takes a trace
    context only from a stream's gRPC headers, so only a stream of its own puts Triton's spans (queue, compute)
    into that request's trace. Sampled traces are few by default (``TelemetrySettings.sample_ratio``); the
    others, and every request without tracing, take the step path.
    """

    def __init__(self, url: str, *, fallback: GenerationBackend | None = None,
                 sequences_per_stream: int = SEQUENCES_PER_STREAM, on_blocks: BlocksCallback | None = None) -> None:
        self.url = url
        self.sequences_per_stream = sequences_per_stream
        self.streams_opened = 0  # Triton streams this backend has opened (recycling included)
        self._grpc = grpc.aio.insecure_channel(url, options=[("grpc.max_send_message_length", 64 << 20),
                                                            ("grpc.max_receive_message_length", 64 << 20)])
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._grpc)
        self._fallback = fallback
        self._streams: dict[str, _ModelStream] = {}
        self._step_models: dict[str, bool] = {}  # model -> takes the step path (asked once)
        self._where: dict[Hashable, _ModelStream] = {}  # live key -> its stream
        self._newest: dict[str, _ModelStream] = {}  # model -> its newest stream (retiring or not): block reports
        self.on_blocks = on_blocks  # a model's prefix-cache blocks (precise cache-aware routing)
        self._closed = False

    def open(self, key: Hashable, model: str, params: GenerateParams, request_id: str, sink: SequenceSink) -> None:
        if self._closed:
            asyncio.get_running_loop().call_soon(sink.failed, key, Unavailable("the step backend is closed"))
            return
        if self._fallback is not None and (self._step_models.get(model) is False or _sampled()):
            self._fallback.open(key, model, params, request_id, sink)
            return
        stream = self._streams.get(model)
        if stream is None:
            stream = self._streams[model] = _ModelStream(self, model)
        self._where[key] = stream
        stream.open(key, params, request_id, sink)

    def cancel(self, key: Hashable) -> None:
        stream = self._where.get(key)
        if stream is not None:
            stream.cancel(key)
        elif self._fallback is not None:  # a no-op there for a key it does not hold
            self._fallback.cancel(key)

    def _forget(self, stream: _ModelStream) -> None:
        if self._streams.get(stream.model) is stream:
            del self._streams[stream.model]

    async def release(self, model: str) -> None:
        """Close ``model``'s stream, if it has one (its attach is a request in flight in Triton, which would hold an
        unload of the model); the next open of the model opens a new one. Called with no sequence live on it."""
        stream = self._streams.get(model)
        if stream is None:
            return
        stream.fail(Unavailable(f"model {model!r} is unloading"))
        await asyncio.gather(*(t for t in (stream.writer, stream.reader) if t is not None), return_exceptions=True)

    async def close(self) -> None:
        """Fail every live sequence with ``Unavailable``, cancel the streams (their attaches) and close the channel."""
        self._closed = True
        streams = list(self._streams.values())
        for stream in streams:
            stream.fail(Unavailable("the executor's step backend closed"))
        tasks = [t for s in streams for t in (s.writer, s.reader) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._grpc.close(None)
