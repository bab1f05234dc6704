"""Triton Python-backend model: a decoupled, token-streaming Llama with continuous batching.

Contract (the executor depends on it):
- inputs: ``input_ids`` INT64 [-1]; ``max_tokens`` INT32 [1]; optional ``temperature`` FP32 [1] (0 = greedy),
  ``top_p`` FP32 [1], ``top_k`` INT32 [1] (0 = off), ``seed`` INT64 [1] (absent = random),
  ``stop_token_ids`` INT64 [-1] (added to the checkpoint's eos ids, unless ``ignore_eos`` is 1: then they alone
  stop), ``repetition_penalty`` / ``presence_penalty`` / ``frequency_penalty`` FP32 [1], ``min_tokens`` INT32 [1],
  ``logit_bias_ids`` INT64 [-1] with ``logit_bias`` FP32 [-1], ``top_logprobs`` INT32 [1] (0 to 20) and
  ``constraint`` BYTES [1] (a grammar, ``inferplane.modeling.constrained``: compiled here, refused with
  INVALID_ARG when it does not compile).
- responses with ``token_ids`` [n >= 1] and ``logprobs`` [n] (the model's log-probability of each token; with
  ``top_logprobs`` k also ``top_token_ids`` and ``top_logprob_values`` [n * k]), in order, as the tokens are
  produced: one token per response while the stream keeps up, the tokens that queued up meanwhile in one
  response when it does not (coalescing under backpressure). A stop token ends the stream and is not sent, but
  counts in ``completion_tokens``.
- then exactly one response flagged ``TRITONSERVER_RESPONSE_COMPLETE_FINAL`` with ``token_ids`` and
  ``logprobs`` empty, ``finish_reason`` ("stop" | "length" | "cancelled"), ``prompt_tokens``,
  ``completion_tokens`` and ``cached_tokens`` (of the prompt, those reused from the prefix cache: parameters
  ``prefix_cache_blocks`` and ``prefix_block_size``, docs/prefix-cache.md). "length" covers both max_tokens
  and the context end (prompt + completion = max_context).
- a bad request gets a single final response carrying a ``TritonError`` (INVALID_ARG); a request a broken step
  took down, one with INTERNAL.
The names, types and shapes are ``inferplane.modeling.contract.LLM``'s.

``execute`` only validates and enqueues. Two threads do the rest:
- the scheduler thread steps ``inferplane.modeling.llama.batching.BatchScheduler``: new requests are prefilled
  and join between decode steps, up to ``max_sequences`` at once (the rest wait FIFO); each step advances
  every sequence by one token in one forward and posts the step's events to the outbox (the prefills' first
  tokens before the decode forward, so that they go out while it runs). It makes no ``pb_utils`` call.
- the IPC thread makes every ``pb_utils`` call after ``initialize``: the responses (drained from the
  outbox), ``request.is_cancelled()`` of each stream at most every ``CANCEL_POLL_S``, the gauges
  ``inferplane_llm_{active_sequences,queued_requests,kv_slots_in_use,kv_slots_total}{model=...}`` and the
  log. Each of those is a blocking round trip to Triton's process (a send: 0.2 ms idle, 1-2 ms under load)
  that releases the GIL, so here it overlaps the next step's compute instead of stalling it. One thread,
  because the stub's IPC deadlocked when a send and an ``is_cancelled`` ran on two threads at once.
A cancelled sequence leaves the batch, and frees its slot, at the next step after the poll that saw it.

Channel (step) mode (``contract.LLMChannel``, ``inferplane.modeling.channel``): a request with a ``channel`` input
is an attach, open or cancel of a channel. The sequences of a channel decode in the same batch as per-request
ones; the IPC thread sends the channel's attach one response per round with every sequence's new tokens, ends
and failures (column-wise), instead of one response per sequence. A generation refused at open is a failed
sequence (INVALID_ARG) in the next frame; a broken step fails every live sequence with INTERNAL. Responses sent
are counted in ``inferplane_llm_responses_total{model,mode}`` (published at most once a second).

Imports: ``inferplane.modeling`` (the repository renderer copies it into this version folder, which Triton's
stub puts on ``sys.path``), torch, numpy and ``triton_python_backend_utils`` only: nothing of the mesh.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from inferplane.modeling.channel import ChannelError, ChannelHub, ResponseCounter, SeqKey
from inferplane.modeling.contract import CHECKPOINT_DIR, DTYPE, INTERNAL, INVALID_ARG, LLM, TORCH_THREADS
from inferplane.modeling.instance import instance_device, int_param, param
from inferplane.modeling.llama import LlamaForCausalLM, SamplingParams, load_model
from inferplane.modeling.llama.batching import (
    NO_SHAPING,
    BatchScheduler,
    Event,
    FinishEvent,
    RequestRefused,
    SchedulerStats,
    SequenceRequest,
    Shaping,
    TokenEvent,
    TokenMatcher,
)
from inferplane.modeling.llama.prefix_cache import DEFAULT_BLOCK_SIZE

IDLE_WAIT_S = 0.05  # both threads wake at least this often to notice finalize()
CANCEL_POLL_S = 0.05  # each live stream is asked is_cancelled() at most this often
IPC_DUTY = 0.5  # the IPC thread's target busy fraction, above which tokens coalesce (parameter ipc_duty)
MAX_PAUSE_S = 0.1  # the longest the IPC thread holds tokens back
STATS_EVERY_S = 10.0  # a busy scheduler logs its step statistics this often


class RequestError(ValueError):
    """A request the model refuses; answered with INVALID_ARG."""


# the contract's names and numpy types, resolved once (the IPC thread builds a response per token)
TOKEN_IDS, LOGPROBS = LLM.TOKEN_IDS.name, LLM.LOGPROBS.name
TOKEN_DTYPE, LOGPROB_DTYPE = np.dtype(LLM.TOKEN_IDS.numpy_dtype), np.dtype(LLM.LOGPROBS.numpy_dtype)
COUNT_DTYPE = np.dtype(LLM.PROMPT_TOKENS.numpy_dtype)
assert np.dtype(LLM.COMPLETION_TOKENS.numpy_dtype) == COUNT_DTYPE


def _triton_error(message: str, code: str) -> Any:
    """A ``TritonError`` with the contract's code (``INVALID_ARG`` ...): the caller's gRPC status says it."""
    return pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))


def _checkpoint_eos_ids(checkpoint_dir: Path, model: LlamaForCausalLM) -> frozenset[int]:
    ids = set(model.config.eos_token_ids)
    gen_cfg = checkpoint_dir / "generation_config.json"
    if gen_cfg.exists():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids |= set([eos] if isinstance(eos, int) else eos or [])
    return frozenset(ids)


def _scalar(request: Any, name: str) -> Any | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    arr = tensor.as_numpy().reshape(-1)
    if arr.size != 1:
        raise RequestError(f"{name} must hold exactly one value, got {arr.size}")
    return arr[0].item()


def _array(request: Any, name: str) -> list[int] | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1).astype(np.int64).tolist()


def _floats(request: Any, name: str) -> list[float] | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1).astype(np.float64).tolist()


def _apply_masks(logits: torch.Tensor, rows: list[tuple[int, TokenMatcher]]) -> None:
    """The grammar masks (``inferplane.modeling.constrained``, imported at the first constrained step)."""
    from inferplane.modeling.constrained import apply_masks

    apply_masks(logits, rows)  # type: ignore[arg-type]  # the scheduler holds only the compiler's matchers


@dataclass(slots=True)
class _Stream:
    """One decoupled request: its Triton request (for is_cancelled) and response sender."""

    request: Any
    sender: Any
    started: float
    triton_id: str
    polled: float = 0.0  # when is_cancelled() was last asked


@dataclass(slots=True)
class _Outgoing:
    """What waits to be sent to one stream: tokens in order, then maybe its end."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_k: int = 0  # alternatives per token in top_ids / top_logprobs
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    finish: FinishEvent | None = None
    error: tuple[str, str] | None = None  # (message, TritonError code): ends the stream instead of a finish


class _Gauges:
    """The scheduler's state as Triton custom metrics; set only when a value changes (each set is an IPC)."""

    NAMES: ClassVar[dict[str, tuple[str, str]]] = {
        "active": ("inferplane_llm_active_sequences", "Sequences in the running batch"),
        "queued": ("inferplane_llm_queued_requests", "Requests waiting for a KV-cache slot"),
        "slots_in_use": ("inferplane_llm_kv_slots_in_use", "KV-cache slots held by running sequences"),
        "slots_total": ("inferplane_llm_kv_slots_total", "KV-cache slots (max_sequences)"),
        "prefix_blocks_used": ("inferplane_llm_prefix_cache_blocks_used", "Prefix-cache blocks holding a prefix"),
        "prefix_blocks_total": ("inferplane_llm_prefix_cache_blocks_total", "Prefix-cache blocks (its budget)"),
    }

    def __init__(self, model_name: str) -> None:
        self.families = [pb_utils.MetricFamily(name=n, description=d, kind=pb_utils.MetricFamily.GAUGE)
                         for n, d in self.NAMES.values()]
        self.metrics = {key: fam.Metric(labels={"model": model_name}) for key, fam in zip(self.NAMES, self.families,
                                                                                            strict=True)}
        self.last: SchedulerStats | None = None

    def update(self, stats: SchedulerStats) -> None:
        if stats == self.last:
            return
        for key, metric in self.metrics.items():
            value = getattr(stats, key)
            if self.last is None or getattr(self.last, key) != value:
                metric.set(float(value))
        self.last = stats


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.name = args.get("model_name", "llm")
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                f"{self.name}: this model streams tokens and needs model_transaction_policy {{ decoupled: true }}"
            )
        checkpoint = param(config, CHECKPOINT_DIR)
        if not checkpoint:
            raise pb_utils.TritonModelException(f"{self.name}: parameter {CHECKPOINT_DIR} is not set")
        self.checkpoint_dir = Path(checkpoint)

        device = instance_device(args, int_param(config, TORCH_THREADS, 0))
        # bf16 on GPUs; fp32 on CPUs, where bf16 matmuls are slow without AMX/AVX-512.
        dtype = param(config, DTYPE) or ("bfloat16" if device.type == "cuda" else "float32")

        self.log(f"loading {self.checkpoint_dir} on {device} as {dtype} ({torch.get_num_threads()} threads), "
                 f"model code {Path(load_model.__code__.co_filename).parents[1]}")
        started = time.monotonic()

        def progress(i: int, n: int, shard: str, elapsed: float) -> None:
            self.log(f"loaded shard {i}/{n} {shard} ({elapsed:.1f}s)")

        self.model = load_model(self.checkpoint_dir, dtype=dtype, device=device, progress=progress)
        self.eos_ids = _checkpoint_eos_ids(self.checkpoint_dir, self.model)
        max_pos = self.model.config.max_position_embeddings
        self.max_context = min(int_param(config, LLM.MAX_CONTEXT, 0) or max_pos, max_pos)
        max_sequences = int_param(config, LLM.MAX_SEQUENCES, 0) or 32
        self.prefix_cache_blocks = int_param(config, LLM.PREFIX_CACHE_BLOCKS, 0)
        self.prefix_block_size = int_param(config, LLM.PREFIX_BLOCK_SIZE, DEFAULT_BLOCK_SIZE)
        if self.prefix_cache_blocks < 0 or self.prefix_block_size < 1:
            raise pb_utils.TritonModelException(
                f"{self.name}: {LLM.PREFIX_CACHE_BLOCKS} must be >= 0 and {LLM.PREFIX_BLOCK_SIZE} >= 1, got "
                f"{self.prefix_cache_blocks} and {self.prefix_block_size}")
        self.scheduler = self._new_scheduler(max_sequences)
        self._compiler: Any = None  # the grammar compiler, made at the first constrained request
        self.ipc_duty = float(param(config, LLM.IPC_DUTY, "") or IPC_DUTY)
        assert 0 < self.ipc_duty <= 1, f"ipc_duty must be in (0, 1], got {self.ipc_duty}"
        self.streams: dict[Hashable, _Stream] = {}  # live requests; the IPC thread removes a finished one
        self._next_id = 0
        self.gauges = _Gauges(self.name)
        self.gauges.update(self.scheduler.stats)
        self.counter = ResponseCounter(pb_utils, self.name)
        self.hub = ChannelHub(pb_utils, self.counter, on_cancel=lambda key: self.scheduler.cancel(key),
                              notify=self._wake_ipc, publishes_blocks=self.prefix_cache_blocks > 0)
        # What the IPC thread is to send: per request id, filled by the scheduler thread and by execute.
        self._outbox: dict[Hashable, _Outgoing] = {}
        self._outbox_ready = threading.Condition()
        self._logs: list[str] = []  # lines for the IPC thread to log (a list append is atomic)
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=target, name=f"{self.name}-{role}", daemon=True)
                         for role, target in (("scheduler", self._schedule), ("ipc", self._ipc_loop))]
        for thread in self._threads:
            thread.start()
        self.log(
            f"ready in {time.monotonic() - started:.1f}s: {self.model.config.num_hidden_layers} layers, "
            f"vocab {self.model.config.vocab_size}, max_context {self.max_context}, "
            f"max_sequences {max_sequences}, eos {sorted(self.eos_ids)}, prefix cache "
            f"{self.prefix_cache_blocks} blocks of {self.prefix_block_size} tokens"
        )

    def log(self, message: str) -> None:
        """Log now: only from initialize, finalize and the IPC thread (see the module docstring)."""
        pb_utils.Logger.log_info(f"[{self.name}] {message}")

    def log_later(self, message: str) -> None:
        self._logs.append(message)

    # ------------------------------------------------------------------ Triton's thread: validate, enqueue

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            try:
                channel = ChannelHub.channel_of(pb_utils, request)
            except ChannelError as e:
                sender = request.get_response_sender()
                rid, self._next_id = self._next_id, self._next_id + 1
                self.streams[rid] = _Stream(request, sender, time.monotonic(), request.request_id())
                self._post_error(rid, str(e), e.code)
                continue
            if channel is not None:
                self.hub.handle(request, channel, self._start_channel_sequence)
                continue
            rid, self._next_id = self._next_id, self._next_id + 1
            self.streams[rid] = _Stream(request, request.get_response_sender(), time.monotonic(),
                                        request.request_id())
            try:
                self.scheduler.add(self._parse(request, rid))
            except (RequestError, RequestRefused) as e:
                self._post_error(rid, str(e), INVALID_ARG)
        return None  # decoupled: the IPC thread answers through the response senders

    def _start_channel_sequence(self, request: Any, key: SeqKey) -> None:
        """An open of a channel: a ValueError (RequestError, RequestRefused) fails the sequence in the next frame."""
        self.scheduler.add(self._parse(request, key))

    def _parse(self, request: Any, rid: Hashable) -> SequenceRequest:
        input_ids = _array(request, LLM.INPUT_IDS.name) or []
        max_tokens = _scalar(request, LLM.MAX_TOKENS.name)
        if max_tokens is None:
            raise RequestError("max_tokens is required")
        temperature = _scalar(request, LLM.TEMPERATURE.name)
        temperature = 0.0 if temperature is None else float(temperature)
        if not temperature >= 0:  # also refuses NaN
            raise RequestError(f"temperature must be >= 0, got {temperature}")
        top_p = _scalar(request, LLM.TOP_P.name)
        top_p = 1.0 if top_p is None else float(top_p)
        if not 0 < top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {top_p}")
        top_k = _scalar(request, LLM.TOP_K.name)
        top_k = 0 if top_k is None else int(top_k)
        if top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {top_k}")
        seed = _scalar(request, LLM.SEED.name)
        explicit_stops = frozenset(_array(request, LLM.STOP_TOKEN_IDS.name) or [])
        ignore_eos = bool(_scalar(request, LLM.IGNORE_EOS.name) or 0)
        stop_ids = explicit_stops if ignore_eos else self.eos_ids | explicit_stops
        sampling = SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, seed=None if seed is None else int(seed)
        )
        top_logprobs = int(_scalar(request, LLM.TOP_LOGPROBS.name) or 0)
        if not 0 <= top_logprobs <= LLM.MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be in [0, {LLM.MAX_TOP_LOGPROBS}], got {top_logprobs}")
        return SequenceRequest(rid, input_ids, int(max_tokens), sampling, stop_ids, self._shaping(request),
                               top_logprobs, self._matcher(request))

    def _shaping(self, request: Any) -> Shaping:
        def number(spec: Any, default: float) -> float:
            value = _scalar(request, spec.name)
            return default if value is None else float(value)

        repetition = number(LLM.REPETITION_PENALTY, 1.0)
        presence, frequency = number(LLM.PRESENCE_PENALTY, 0.0), number(LLM.FREQUENCY_PENALTY, 0.0)
        min_tokens = int(number(LLM.MIN_TOKENS, 0))
        if not repetition > 0:
            raise RequestError(f"repetition_penalty must be > 0, got {repetition}")
        for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
            if not -2 <= value <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {value}")
        if min_tokens < 0:
            raise RequestError(f"min_tokens must be >= 0, got {min_tokens}")
        bias_ids = _array(request, LLM.LOGIT_BIAS_IDS.name) or []
        bias = _floats(request, LLM.LOGIT_BIAS.name) or []
        if len(bias_ids) != len(bias):
            raise RequestError(f"logit_bias_ids and logit_bias differ in length ({len(bias_ids)}, {len(bias)})")
        if any(not -100 <= b <= 100 for b in bias):
            raise RequestError("logit_bias values must be in [-100, 100]")
        shaping = Shaping(repetition, presence, frequency, min_tokens, dict(zip(bias_ids, bias, strict=True)))
        return shaping if shaping.active else NO_SHAPING

    def _matcher(self, request: Any) -> TokenMatcher | None:
        """A fresh grammar state for the request's ``constraint`` (compiled grammars are cached by the compiler)."""
        tensor = pb_utils.get_input_tensor_by_name(request, LLM.CONSTRAINT.name)
        if tensor is None:
            return None
        values = tensor.as_numpy().reshape(-1)
        if values.size != 1:
            raise RequestError(f"{LLM.CONSTRAINT.name} must hold one value, got {values.size}")
        raw = values[0]
        spec = raw.decode() if isinstance(raw, bytes) else str(raw)
        from inferplane.modeling.constrained import ConstraintError, GrammarCompiler

        if self._compiler is None:
            # One mask thread: a pool as wide as the machine fought torch's OpenMP threads for the cores (measured
            # on 2 cores, 32 sequences half constrained: +4-5 ms a step with the default pool, within noise with one).
            self._compiler = GrammarCompiler(self.checkpoint_dir, self.model.config.vocab_size, self.eos_ids,
                                             threads=1)
        try:
            return self._compiler.compile(spec).matcher()
        except ConstraintError as e:
            raise RequestError(f"constraint: {e}") from None

    # ------------------------------------------------------------------ the scheduler thread

    def _schedule(self) -> None:
        steps, busy_s, cpu_s, rows, last_stats = 0, 0.0, 0.0, 0, time.monotonic()
        while not self._stopping.is_set():
            if not self.scheduler.wait_for_work(IDLE_WAIT_S):
                continue
            t0, c0 = time.monotonic(), time.thread_time()
            try:
                events = self.scheduler.step(early=self._post_step)  # first tokens go out before the decode
            except Exception as e:  # a broken step must not leave streams hanging
                self.log_later(f"scheduler step failed: {e!r}; failing {len(self.streams)} requests")
                self._fail_all(repr(e))
                continue
            self._post_step(events)
            steps, rows = steps + 1, rows + self.scheduler.stats.active
            busy_s, cpu_s = busy_s + time.monotonic() - t0, cpu_s + time.thread_time() - c0
            if t0 - last_stats > STATS_EVERY_S:
                # wall vs this thread's CPU per step: the gap is time spent waiting for a core or the GIL
                self.log_later(f"scheduler: {steps} steps, {busy_s / steps * 1e3:.2f} ms/step "
                               f"({cpu_s / steps * 1e3:.2f} ms CPU), {rows / steps:.1f} sequences/step, "
                               f"now {self.scheduler.stats}")
                steps, busy_s, cpu_s, rows, last_stats = 0, 0.0, 0.0, 0, t0

    def _post_step(self, events: list[Event]) -> None:
        """A step's news for the IPC thread: the prefix cache's block changes, then the events (same frame)."""
        self._publish_blocks()
        self._post(events)

    def _publish_blocks(self) -> None:
        """The prefix cache's changes of the step, to every channel (before the step's tokens: same frame)."""
        cache = self.scheduler.prefix_cache
        if cache is not None:
            stored, removed = cache.take_changes()
            if stored or removed:
                self.hub.blocks(stored, removed)

    def _post(self, events: list[Event]) -> None:
        """Hand a step's events to the IPC thread; a stream's tokens queue up while that thread is busy."""
        if not events:
            return
        with self._outbox_ready:
            box = self._outbox
            for ev in events:
                out = box.get(ev.id)
                if out is None:
                    out = box[ev.id] = _Outgoing()
                if isinstance(ev, TokenEvent):
                    out.ids.append(ev.token_id)
                    out.logprobs.append(ev.logprob)
                    if ev.top:
                        out.top_k = len(ev.top)
                        for tid, lp in ev.top:
                            out.top_ids.append(tid)
                            out.top_logprobs.append(lp)
                else:
                    out.finish = ev
            self._outbox_ready.notify()

    def _post_error(self, rid: Hashable, message: str, code: str) -> None:
        with self._outbox_ready:
            out = self._outbox.setdefault(rid, _Outgoing())
            out.error = (message, code)
            self._outbox_ready.notify()

    def _wake_ipc(self) -> None:
        with self._outbox_ready:
            self._outbox_ready.notify()

    def _fail_all(self, message: str) -> None:
        for rid in [*self.streams, *self.hub.live_keys()]:
            self._post_error(rid, message, INTERNAL)
        self.scheduler = self._new_scheduler(self.scheduler.max_sequences)
        self.hub.blocks([], [], reset=True)  # the new scheduler's prefix cache is empty

    def _new_scheduler(self, max_sequences: int) -> BatchScheduler:
        return BatchScheduler(self.model, max_sequences=max_sequences, max_context=self.max_context,
                              apply_masks=_apply_masks, prefix_cache_blocks=self.prefix_cache_blocks,
                              prefix_block_size=self.prefix_block_size)

    # ------------------------------------------------------------------ the IPC thread

    def _ipc_loop(self) -> None:
        pause = 0.0
        while not self._stopping.is_set():
            if pause > 0 and self._stopping.wait(pause):
                break
            with self._outbox_ready:
                if not self._outbox:
                    self._outbox_ready.wait(CANCEL_POLL_S)
                box, self._outbox = self._outbox, {}
            started = time.monotonic()
            self._send(box)
            # Coalescing under backpressure: delivering a response costs CPU here, in Triton's server and in
            # its client, on the cores the model computes on. After a round of sends that took r seconds,
            # pause r * (1 / IPC_DUTY - 1): tokens produced meanwhile go out together. One stream's round
            # (~0.3 ms) is far shorter than a step, so it still gets one token per response.
            pause = min((time.monotonic() - started) * (1 / self.ipc_duty - 1), MAX_PAUSE_S)
            self._poll_cancellations()
            self.counter.publish(time.monotonic())
            self.gauges.update(self.scheduler.stats)
            self._flush_logs()

    def _send(self, box: dict[Hashable, _Outgoing]) -> None:
        hub = self.hub
        for rid, out in box.items():
            if type(rid) is SeqKey:  # a channel's sequence: into its channel's next frame
                if out.ids:
                    hub.tokens(rid, out.ids, out.logprobs, out.top_k, out.top_ids, out.top_logprobs)
                if out.error is not None:
                    hub.failed(rid, out.error[1], out.error[0])
                elif out.finish is not None:
                    hub.finished(rid, out.finish.reason, out.finish.prompt_tokens, out.finish.completion_tokens,
                                 out.finish.cached_tokens)
                continue
            stream = self.streams.get(rid)
            if stream is None:
                continue
            if out.ids:
                tensors = [pb_utils.Tensor(TOKEN_IDS, np.array(out.ids, dtype=TOKEN_DTYPE)),
                           pb_utils.Tensor(LOGPROBS, np.array(out.logprobs, dtype=LOGPROB_DTYPE))]
                if out.top_ids:
                    tensors += [pb_utils.Tensor(LLM.TOP_TOKEN_IDS.name, np.array(out.top_ids, dtype=TOKEN_DTYPE)),
                                pb_utils.Tensor(LLM.TOP_LOGPROB_VALUES.name,
                                                np.array(out.top_logprobs, dtype=LOGPROB_DTYPE))]
                response = pb_utils.InferenceResponse(output_tensors=tensors)
                try:
                    stream.sender.send(response)
                    self.counter.count("request")
                except Exception:  # the client went away between two polls
                    self.scheduler.cancel(rid)
            if out.error is not None:
                del self.streams[rid]
                message, code = out.error
                self._send_final(stream.sender, pb_utils.InferenceResponse(error=_triton_error(message, code)))
            elif out.finish is not None:
                del self.streams[rid]
                self._finish(stream, out.finish)
        hub.flush()  # one response per channel with news

    def _finish(self, stream: _Stream, ev: FinishEvent) -> None:
        self._send_final(stream.sender, pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(TOKEN_IDS, np.zeros([0], dtype=TOKEN_DTYPE)),
            pb_utils.Tensor(LOGPROBS, np.zeros([0], dtype=LOGPROB_DTYPE)),
            pb_utils.Tensor(LLM.FINISH_REASON.name, np.array([ev.reason.encode()], dtype=np.object_)),
            pb_utils.Tensor(LLM.PROMPT_TOKENS.name, np.array([ev.prompt_tokens], dtype=COUNT_DTYPE)),
            pb_utils.Tensor(LLM.COMPLETION_TOKENS.name, np.array([ev.completion_tokens], dtype=COUNT_DTYPE)),
            pb_utils.Tensor(LLM.CACHED_TOKENS.name, np.array([ev.cached_tokens], dtype=COUNT_DTYPE)),
        ]))
        elapsed = time.monotonic() - stream.started
        self.log(
            f"request {stream.triton_id or ev.id}: finish={ev.reason} prompt_tokens={ev.prompt_tokens} "
            f"completion_tokens={ev.completion_tokens} cached_tokens={ev.cached_tokens} "
            f"({ev.completion_tokens / max(elapsed, 1e-9):.1f} tok/s)"
        )

    def _poll_cancellations(self) -> None:
        now = time.monotonic()
        for rid, stream in list(self.streams.items()):
            if now - stream.polled < CANCEL_POLL_S:
                continue
            stream.polled = now
            if stream.request.is_cancelled():
                self.scheduler.cancel(rid)

    def _flush_logs(self) -> None:
        while self._logs:
            self.log(self._logs.pop(0))

    def _send_final(self, sender: Any, response: Any) -> None:
        try:
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self.counter.count("request")
        except Exception as e:  # e.g. the client has gone; nothing is left to tell it
            self.log(f"could not send the final response: {e!r}")

    def finalize(self) -> None:
        self.log("unloading")
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.scheduler.cancel_all()
        self._post(self.scheduler.step())
        box, self._outbox = self._outbox, {}
        self._send(box)  # every stream and channel sequence still open ends with finish_reason "cancelled"
        self.hub.close()  # every attach ends
        self.counter.publish(time.monotonic(), force=True)
        self._flush_logs()
        del self.model
