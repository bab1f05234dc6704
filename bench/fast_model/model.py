"""fast-sim: a BENCHMARK INSTRUMENT, not a model. A decoupled Triton model that emits tokens at a set rate.

Like llm-d's inference simulator, it does no compute: it stands in for a GPU so that a benchmark measures what the
mesh (Envoy, gateway, router, executor, metering) and Triton spend per token, apart from any model. Only
``bench/fast_model/catalog.yaml`` names it; the shipped catalog never serves it.

It speaks the LLM's tensor contract (``inferplane.modeling.contract.LLM``), so the executor and router cannot tell
it from the LLM:
- inputs: ``input_ids``, ``max_tokens``; ``stop_token_ids`` are honoured; ``temperature``, ``top_p``, ``top_k``
  and ``seed`` are accepted and ignored (the ids are deterministic).
- token responses ``token_ids`` [n >= 1] and ``logprobs`` [n] (zeros), then one final response with both empty
  and ``finish_reason`` ("stop" | "length" | "cancelled"), ``prompt_tokens``, ``completion_tokens``.

Timing, as an engine's steps: one step every ``1 / tokens_per_s`` seconds; each step gives every live sequence one
token; a new sequence's first token comes at the first step ``first_token_ms`` or more after it arrived (one
clock for all sequences, so that a step's tokens of many sequences fall due together). Tokens are due by the clock,
not by how fast they are sent: when sending falls behind (the CPU is busy), the tokens due meanwhile go out together
in one response, as a real engine's do. The ids cycle through the upper seven eighths of the vocabulary
(``checkpoint_dir``'s config.json), skipping the eos ids, so a tokenizer turns them into text.

It speaks the channel (step) mode too (``contract.LLMChannel``, ``inferplane.modeling.channel``, as the LLM): many
sequences on one stream, each engine step's tokens of a channel's sequences in one response, so that the mesh's
ceiling can be measured on the step path. Responses sent are counted in ``inferplane_llm_responses_total``.

One thread makes every ``pb_utils`` call (sends and ``is_cancelled``), as in the LLM model; ``execute`` only
enqueues. Imports: ``inferplane.modeling.contract`` and ``.channel`` (copied beside this file by the renderer),
numpy and ``triton_python_backend_utils``: nothing of the mesh.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from inferplane.modeling.channel import ChannelError, ChannelHub, ResponseCounter, SeqKey
from inferplane.modeling.contract import CHECKPOINT_DIR, INVALID_ARG, LLM

TOKENS_PER_S = "tokens_per_s"  # parameter: tokens per second per sequence (one engine step per 1/rate)
FIRST_TOKEN_MS = "first_token_ms"  # parameter: time to the first token; default one step
CANCEL_POLL_S = 0.05  # each live stream is asked is_cancelled() at most this often
IDLE_WAIT_S = 0.05  # the thread wakes at least this often to notice finalize()

TOKEN_DTYPE = np.dtype(LLM.TOKEN_IDS.numpy_dtype)
LOGPROB_DTYPE = np.dtype(LLM.LOGPROBS.numpy_dtype)
COUNT_DTYPE = np.dtype(LLM.PROMPT_TOKENS.numpy_dtype)


def _param(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return default if not value or value.startswith("${") else value


@dataclass(slots=True)
class _Sequence:
    """One generation: a decoupled request (``request``, ``sender``), or a channel's sequence (``key``)."""

    request: Any
    sender: Any
    prompt_tokens: int
    max_tokens: int  # already capped by the context
    stops: frozenset[int]
    first_at: float  # when its first token is due (monotonic)
    length_reason: str = "length"
    sent: int = 0  # completion tokens generated so far (a stop token included)
    polled: float = 0.0
    key: SeqKey | None = None  # a channel's sequence: its news go through the ChannelHub


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.name = args.get("model_name", "fast-sim")
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(f"{self.name}: needs model_transaction_policy {{ decoupled: true }}")
        checkpoint = json.loads((Path(_param(config, CHECKPOINT_DIR, ".")) / "config.json").read_text())
        eos = checkpoint.get("eos_token_id", [])
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else eos)
        vocab = int(checkpoint["vocab_size"])
        self.vocab = np.array([i for i in range(vocab // 8, vocab) if i not in self.eos_ids], dtype=TOKEN_DTYPE)
        self.max_context = int(_param(config, LLM.MAX_CONTEXT, "0")) or int(checkpoint["max_position_embeddings"])
        rate = float(_param(config, TOKENS_PER_S, "50"))
        assert rate > 0, f"{TOKENS_PER_S} must be > 0, got {rate}"
        self.step_s = 1.0 / rate
        self.first_s = float(_param(config, FIRST_TOKEN_MS, str(self.step_s * 1000))) / 1000
        self._epoch = time.monotonic()  # the engine's step clock starts here
        # from execute (list append/swap is atomic): (request, sender, refusal) of per-request generations, the
        # channels' parsed sequences and the channel sequences to cancel
        self._incoming: list[tuple[Any, Any, str | None]] = []
        self._incoming_seqs: list[_Sequence] = []
        self._cancels: list[SeqKey] = []
        self.counter = ResponseCounter(pb_utils, self.name)
        self.hub = ChannelHub(pb_utils, self.counter, on_cancel=self._cancel_later, notify=lambda: self._wake.set())
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.live: list[_Sequence] = []
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-engine", daemon=True)
        self._thread.start()
        pb_utils.Logger.log_info(f"[{self.name}] BENCHMARK INSTRUMENT (no model): {rate:g} tokens/s per sequence, "
                                 f"first token after {self.first_s * 1000:.0f} ms, vocab {vocab}, "
                                 f"max_context {self.max_context}")

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            try:
                channel = ChannelHub.channel_of(pb_utils, request)
            except ChannelError as e:
                self._incoming.append((request, request.get_response_sender(), str(e)))
                continue
            if channel is None:
                self._incoming.append((request, request.get_response_sender(), None))
            else:
                self.hub.handle(request, channel, self._start_channel_sequence)
        self._wake.set()
        return None

    def _start_channel_sequence(self, request: Any, key: SeqKey) -> None:
        """A channel's open (a ValueError fails the sequence in its channel's next frame)."""
        seq = self._parse(request, None, time.monotonic())
        seq.key = key
        self._incoming_seqs.append(seq)

    def _cancel_later(self, key: SeqKey) -> None:
        self._cancels.append(key)
        self._wake.set()

    # ------------------------------------------------------------------ the engine thread (every pb_utils call)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._admit()
            if not self.live:
                self.hub.flush()
                self.counter.publish(time.monotonic())
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            now = time.monotonic()
            for seq in list(self.live):
                self._advance(seq, now)
            self.hub.flush()  # one response per channel for this step
            self._poll_cancellations(now)
            self.counter.publish(now)
            # sleep to the next step of the earliest sequence (the clock decides what is due, not this sleep)
            nxt = min(s.first_at + s.sent * self.step_s for s in self.live) if self.live else now + IDLE_WAIT_S
            self._wake.wait(max(0.0, min(nxt - time.monotonic(), IDLE_WAIT_S)))
            self._wake.clear()
        for seq in list(self.live):
            self._finish(seq, "cancelled")
        self.hub.close()
        self.counter.publish(time.monotonic(), force=True)

    def _admit(self) -> None:
        incoming, self._incoming = self._incoming, []
        seqs, self._incoming_seqs = self._incoming_seqs, []
        self.live += seqs
        now = time.monotonic()
        for request, sender, refusal in incoming:
            try:
                if refusal is not None:
                    raise ValueError(refusal)
                self.live.append(self._parse(request, sender, now))
            except ValueError as e:
                error = pb_utils.TritonError(str(e), getattr(pb_utils.TritonError, INVALID_ARG))
                final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                sender.send(pb_utils.InferenceResponse(error=error), flags=final)
        if self._cancels:
            cancels, self._cancels = set(self._cancels), []
            for seq in [s for s in self.live if s.key in cancels]:
                self._finish(seq, "cancelled")

    def _parse(self, request: Any, sender: Any, now: float) -> _Sequence:
        ids = pb_utils.get_input_tensor_by_name(request, LLM.INPUT_IDS.name)
        prompt = 0 if ids is None else int(ids.as_numpy().size)
        if prompt == 0:
            raise ValueError("input_ids must hold at least one token")
        if prompt >= self.max_context:
            raise ValueError(f"the prompt ({prompt} tokens) leaves no room in the context ({self.max_context})")
        max_tokens = pb_utils.get_input_tensor_by_name(request, LLM.MAX_TOKENS.name)
        if max_tokens is None or max_tokens.as_numpy().size != 1 or int(max_tokens.as_numpy().reshape(-1)[0]) < 1:
            raise ValueError("max_tokens must hold one value >= 1")
        wanted = int(max_tokens.as_numpy().reshape(-1)[0])
        stops = pb_utils.get_input_tensor_by_name(request, LLM.STOP_TOKEN_IDS.name)
        stop_ids = self.eos_ids | frozenset([] if stops is None else stops.as_numpy().reshape(-1).tolist())
        return _Sequence(request, sender, prompt, min(wanted, self.max_context - prompt), stop_ids,
                         first_at=self._step_at(now + self.first_s))

    def _step_at(self, t: float) -> float:
        """The first engine step at or after ``t``: every sequence's tokens fall due on one shared clock, as a real
        engine's steps do, so that one step's tokens of many sequences go out together (one frame per channel)."""
        return self._epoch + math.ceil((t - self._epoch) / self.step_s) * self.step_s

    def _advance(self, seq: _Sequence, now: float) -> None:
        due = min(seq.max_tokens, math.floor((now - seq.first_at) / self.step_s) + 1 if now >= seq.first_at else 0)
        if due <= seq.sent:
            return
        positions = np.arange(seq.sent, due)
        ids = self.vocab[(positions * 7 + seq.prompt_tokens) % self.vocab.size]  # deterministic, cheap
        stop_at = next((i for i, t in enumerate(ids.tolist()) if t in seq.stops), None)
        if stop_at is not None:
            ids = ids[:stop_at]
        if ids.size and seq.key is not None:
            self.hub.tokens(seq.key, ids.tolist(), [0.0] * ids.size)
        elif ids.size:
            try:
                seq.sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(LLM.TOKEN_IDS.name, ids),
                    pb_utils.Tensor(LLM.LOGPROBS.name, np.zeros(ids.size, dtype=LOGPROB_DTYPE)),
                ]))
                self.counter.count("request")
            except Exception:  # the client went away between two polls
                self._finish(seq, "cancelled")
                return
        if stop_at is not None:
            seq.sent += stop_at + 1  # the stop token counts, unsent
            self._finish(seq, "stop")
        else:
            seq.sent = due
            if seq.sent >= seq.max_tokens:
                self._finish(seq, "length")

    def _poll_cancellations(self, now: float) -> None:
        for seq in list(self.live):
            if seq.key is None and now - seq.polled >= CANCEL_POLL_S:
                seq.polled = now
                if seq.request.is_cancelled():
                    self._finish(seq, "cancelled")

    def _finish(self, seq: _Sequence, reason: str) -> None:
        if seq in self.live:
            self.live.remove(seq)
        if reason == "cancelled":  # rare; a log line per finished request would cost an IPC each
            pb_utils.Logger.log_info(f"[{self.name}] cancelled after {seq.sent} tokens")
        if seq.key is not None:
            self.hub.finished(seq.key, reason, seq.prompt_tokens, seq.sent)
            return
        try:
            seq.sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(LLM.TOKEN_IDS.name, np.zeros([0], dtype=TOKEN_DTYPE)),
                pb_utils.Tensor(LLM.LOGPROBS.name, np.zeros([0], dtype=LOGPROB_DTYPE)),
                pb_utils.Tensor(LLM.FINISH_REASON.name, np.array([reason.encode()], dtype=np.object_)),
                pb_utils.Tensor(LLM.PROMPT_TOKENS.name, np.array([seq.prompt_tokens], dtype=COUNT_DTYPE)),
                pb_utils.Tensor(LLM.COMPLETION_TOKENS.name, np.array([seq.sent], dtype=COUNT_DTYPE)),
            ]), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self.counter.count("request")
        except Exception:  # the client has gone; nothing is left to tell it
            pass

    def finalize(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=10)
