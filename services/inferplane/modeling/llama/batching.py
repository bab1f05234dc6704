"""Continuous batching: a running batch of sequences that advance one token per step in one forward.

The scheduler owns a static KV cache of ``max_sequences`` slots ([max_sequences, H_kv, max_context, D]
per layer, see ``KVCache``). Each step:

1. applies cancellations: a cancelled sequence leaves and its slot is free for this very step;
2. admits waiting requests (FIFO) into free slots, lowest slot first, up to ``prefill_token_budget``
   padded prompt tokens: ONE batched prefill forward (prompts right-padded) writes each prompt's keys
   into its slot and samples each sequence's first token;
3. runs ONE batched decode forward over cache rows [0, hi) (hi = highest slot in use + 1): row b feeds
   its pending token at its own position and attends to its own prefix only (a per-row mask), so a
   sequence gets the same tokens alone or in a full batch. Free rows below hi (holes) ride along on a
   dummy token at position 0 and are ignored;
4. samples every row (greedy rows with one batched argmax, sampled rows each with its own
   ``torch.Generator``) and finishes sequences on a stop id, max_tokens or the context end.

``step()`` returns the events of that step in order: ``TokenEvent`` per produced token and one
``FinishEvent`` per sequence that left. A stop token is not sent, but counts in ``completion_tokens``
(as in ``generate()``). ``add`` and ``cancel`` may be called from any thread; ``step`` from one thread.
This module knows nothing of Triton: ``inferplane/executor/triton_models/llm/model.py`` is a thin adapter around it.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from inferplane.modeling.llama.generate import FinishReason
from inferplane.modeling.llama.model import LlamaForCausalLM
from inferplane.modeling.llama.sampling import SamplingParams, logits_to_probs, make_generator


class RequestRefused(ValueError):
    """A request the scheduler cannot serve (the message says why); nothing was queued."""


@dataclass(frozen=True, slots=True)
class SequenceRequest:
    id: Hashable
    prompt_ids: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class TokenEvent:
    id: Hashable
    token_id: int
    logprob: float


@dataclass(frozen=True, slots=True)
class FinishEvent:
    id: Hashable
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


Event = TokenEvent | FinishEvent


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    active: int  # sequences in the running batch
    queued: int  # requests waiting for a slot
    slots_in_use: int  # KV-cache slots held (one per active sequence)
    slots_total: int  # max_sequences


@dataclass(slots=True)
class _Sequence:
    req: SequenceRequest
    slot: int
    budget: int  # completion tokens allowed: min(max_tokens, max_context - prompt)
    generator: torch.Generator | None
    pos: int = 0  # absolute position of the pending token (the one the next decode feeds)
    completion_tokens: int = 0


class BatchScheduler:
    """Continuous batching over ``model`` with at most ``max_sequences`` sequences of ``max_context`` tokens."""

    def __init__(
        self, model: LlamaForCausalLM, *, max_sequences: int = 32, max_context: int | None = None,
        prefill_token_budget: int = 2048,
    ) -> None:
        max_pos = model.config.max_position_embeddings
        max_context = max_context or max_pos
        assert max_sequences >= 1, f"max_sequences must be >= 1, got {max_sequences}"
        assert 2 <= max_context <= max_pos, f"max_context must be in [2, {max_pos}], got {max_context}"
        self.model, self.max_sequences, self.max_context = model, max_sequences, max_context
        # Prompt tokens prefilled in one step (at least one request): bounds the stall a burst of
        # arrivals puts on the running batch's inter-token latency.
        self.prefill_token_budget = prefill_token_budget
        device = model.device
        model.setup_caches(max_sequences, max_context)
        # Per-slot decode inputs, kept on the device and updated in place every step.
        self._tokens = torch.zeros(max_sequences, dtype=torch.long, device=device)  # [N] pending token
        self._positions = torch.zeros(max_sequences, dtype=torch.long, device=device)  # [N] its position
        self._live = torch.zeros(max_sequences, dtype=torch.long, device=device)  # [N] 1 = slot in use
        self._slots: list[_Sequence | None] = [None] * max_sequences
        self._free = list(range(max_sequences))  # a heap: the lowest free slot first keeps rows dense
        self._active: dict[Hashable, _Sequence] = {}
        self._queue: deque[SequenceRequest] = deque()
        self._cancelled: set[Hashable] = set()
        # Guards the queue, the cancel set and the active map (step() holds it only to mutate them).
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)

    # ------------------------------------------------------------------ any thread

    def validate(self, req: SequenceRequest) -> None:
        """Raise ``RequestRefused`` when ``req`` cannot be served (``add`` calls it)."""
        if not req.prompt_ids:
            raise RequestRefused("input_ids must not be empty")
        vocab = self.model.config.vocab_size
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= vocab:
            raise RequestRefused(f"input_ids must be in [0, {vocab})")
        if len(req.prompt_ids) >= self.max_context:
            raise RequestRefused(
                f"prompt of {len(req.prompt_ids)} tokens does not fit the context of {self.max_context} tokens "
                "(at least one token must remain for the completion)"
            )
        if req.max_tokens < 1:
            raise RequestRefused(f"max_tokens must be >= 1, got {req.max_tokens}")

    def add(self, req: SequenceRequest) -> None:
        """Queue a request (FIFO); it joins the batch at the next step with a free slot."""
        self.validate(req)
        with self._work:
            if req.id in self._active or any(q.id == req.id for q in self._queue):
                raise RequestRefused(f"request id {req.id!r} is already in use")
            self._queue.append(req)
            self._work.notify()

    def cancel(self, request_id: Hashable) -> None:
        """Stop a queued or running request; it leaves (and frees its slot) at the next step."""
        with self._work:
            self._cancelled.add(request_id)
            self._work.notify()

    def cancel_all(self) -> None:
        with self._work:
            self._cancelled.update(self._active)
            self._cancelled.update(q.id for q in self._queue)
            self._work.notify()

    def has_work(self) -> bool:
        return bool(self._active or self._queue or self._cancelled)

    def wait_for_work(self, timeout: float) -> bool:
        """Block until there is something to step (or ``timeout`` seconds); True when there is."""
        with self._work:
            return self._work.wait_for(self.has_work, timeout)

    @property
    def stats(self) -> SchedulerStats:
        in_use = self.max_sequences - len(self._free)
        return SchedulerStats(len(self._active), len(self._queue), in_use, self.max_sequences)

    # ------------------------------------------------------------------ the stepping thread

    def step(self) -> list[Event]:
        """Cancel, admit (one batched prefill), then advance every active sequence by one token in one forward."""
        events: list[Event] = []
        with torch.inference_mode():
            admitted = self._take_cancels_and_admissions(events)
            if admitted:
                self._prefill(admitted, events)
            if self._active:
                self._decode(events)
        return events

    def _take_cancels_and_admissions(self, events: list[Event]) -> list[SequenceRequest]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled:
                kept = deque[SequenceRequest]()
                for q in self._queue:
                    if q.id in cancelled:
                        events.append(FinishEvent(q.id, "cancelled", len(q.prompt_ids), 0))
                    else:
                        kept.append(q)
                self._queue = kept
            for rid in cancelled & self._active.keys():
                self._finish(self._active[rid], "cancelled", events)
            admitted: list[SequenceRequest] = []
            longest = 0
            while self._queue and len(admitted) < len(self._free):
                longest = max(longest, len(self._queue[0].prompt_ids))
                # The batched prefill pads every prompt to the longest one.
                if admitted and (len(admitted) + 1) * longest > self.prefill_token_budget:
                    break
                admitted.append(self._queue.popleft())
            return admitted

    def _prefill(self, admitted: list[SequenceRequest], events: list[Event]) -> None:
        device = self.model.device
        seqs: list[_Sequence] = []
        for req in admitted:
            budget = min(req.max_tokens, self.max_context - len(req.prompt_ids))
            seq = _Sequence(req, heapq.heappop(self._free), budget, make_generator(req.sampling, device))
            seq.pos = len(req.prompt_ids)
            with self._lock:
                self._active[req.id] = seq
            self._slots[seq.slot] = seq
            seqs.append(seq)
        longest = max(s.pos for s in seqs)
        padded = [list(s.req.prompt_ids) + [0] * (longest - s.pos) for s in seqs]
        idx = torch.tensor(padded, dtype=torch.long, device=device)  # [n, S] right-padded prompts
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=device)  # [n]
        lengths = torch.tensor([s.pos for s in seqs], dtype=torch.long, device=device)  # [n]
        logits = self.model.prefill_slots(idx, slots, lengths - 1)  # [n, V]
        tokens, chosen = self._sample(logits, list(enumerate(seqs)))  # [n], [n]
        self._tokens[slots] = tokens
        self._positions[slots] = lengths
        self._live[slots] = 1
        ids, lps = tokens.tolist(), chosen.tolist()
        for i, seq in enumerate(seqs):
            self._advance(seq, ids[i], lps[i], events)

    def _decode(self, events: list[Event]) -> None:
        active = list(self._active.values())
        hi = max(s.slot for s in active) + 1  # rows [0, hi); free rows below hi are holes
        end = max(s.pos for s in active) + 1  # keys any row may read
        logits = self.model.decode_rows(self._tokens[:hi], self._positions[:hi], end)  # [hi, V]
        tokens, chosen = self._sample(logits, [(s.slot, s) for s in active])  # [hi], [hi]
        self._tokens[:hi] = tokens
        self._positions[:hi] += self._live[:hi]  # holes stay at position 0
        ids, lps = tokens.tolist(), chosen.tolist()  # the step's one host sync
        for seq in active:
            seq.pos += 1
            self._advance(seq, ids[seq.slot], lps[seq.slot], events)

    @staticmethod
    def _sample(logits: Tensor, rows: list[tuple[int, _Sequence]]) -> tuple[Tensor, Tensor]:
        """logits: [R, V]; rows: (row, sequence) pairs. Returns each row's token [R] and its logprob [R].

        Greedy rows share one argmax; a sampled row draws from its own generator, so a seeded request gets
        the same tokens whatever else runs. Logprobs are of the unmodified distribution (as OpenAI reports).
        """
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)  # [R, V]
        tokens = torch.argmax(logits, dim=-1)  # [R]
        for row, seq in rows:
            if not seq.req.sampling.greedy:
                probs = logits_to_probs(logits[row], seq.req.sampling)  # [V]
                tokens[row] = torch.multinomial(probs, 1, generator=seq.generator)[0]
        return tokens, logprobs.gather(1, tokens[:, None])[:, 0]

    def _advance(self, seq: _Sequence, token: int, logprob: float, events: list[Event]) -> None:
        """Account one produced token: stop (not sent), send it, then maybe finish on length."""
        seq.completion_tokens += 1
        if token in seq.req.stop_ids:
            self._finish(seq, "stop", events)
            return
        events.append(TokenEvent(seq.req.id, token, logprob))
        if seq.completion_tokens >= seq.budget:
            self._finish(seq, "length", events)

    def _finish(self, seq: _Sequence, reason: FinishReason, events: list[Event]) -> None:
        with self._lock:
            del self._active[seq.req.id]
        self._slots[seq.slot] = None
        self._live[seq.slot] = 0
        self._positions[seq.slot] = 0
        heapq.heappush(self._free, seq.slot)
        events.append(FinishEvent(seq.req.id, reason, len(seq.req.prompt_ids), seq.completion_tokens))
