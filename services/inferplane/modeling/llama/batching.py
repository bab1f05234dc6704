"""Continuous batching: a running batch of sequences that advance one token per step in one forward.

The scheduler owns a static KV cache of ``max_sequences`` slots ([max_sequences, H_kv, max_context, D]
per layer, see ``KVCache``). Each step:

1. applies cancellations: a cancelled sequence leaves and its slot is free for this very step;
2. admits waiting requests (FIFO) into free slots, lowest slot first, up to ``prefill_token_budget``
   padded prompt tokens: ONE batched prefill forward (prompts right-padded) writes each prompt's keys
   into its slot and samples each sequence's first token. With a prefix cache (``prefix_cache_blocks`` > 0,
   ``llama/prefix_cache.py``) a prompt's cached full blocks are copied into its slot first and the forward
   computes only the rest, from that offset; afterwards its new full blocks are kept for later prompts;
3. runs ONE batched decode forward over cache rows [0, hi) (hi = highest slot in use + 1): row b feeds
   its pending token at its own position and attends to its own prefix only (a per-row mask), so a
   sequence gets the same tokens alone or in a full batch. Free rows below hi (holes) ride along on a
   dummy token at position 0 and are ignored;
4. samples every row (greedy rows with one batched argmax, sampled rows each with its own
   ``torch.Generator``) and finishes sequences on a stop id, max_tokens or the context end.

Per row, before sampling (only for sequences that ask, so a plain batch pays nothing): logit bias, the
repetition / presence / frequency penalties, ``min_tokens`` (the stop ids masked until then) and a grammar's token
mask (``inferplane.modeling.constrained``: constrained and free sequences share the batch). Reported
log-probabilities (and the ``top_logprobs`` alternatives) are always the model's own distribution, before any of
these.

``step()`` returns the events of that step in order: ``TokenEvent`` per produced token and one
``FinishEvent`` per sequence that left. A stop token is not sent, but counts in ``completion_tokens``
(as in ``generate()``). ``add`` and ``cancel`` may be called from any thread; ``step`` from one thread.
This module knows nothing of Triton: ``inferplane/executor/triton_models/llm/model.py`` is a thin adapter around it.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from inferplane.modeling.llama.generate import FinishReason
from inferplane.modeling.llama.model import LlamaForCausalLM
from inferplane.modeling.llama.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache
from inferplane.modeling.llama.sampling import SamplingParams, logits_to_probs, make_generator


class RequestRefused(ValueError):
    """A request the scheduler cannot serve (the message says why); nothing was queued."""


class TokenMatcher(Protocol):
    """One sequence's grammar state (``inferplane.modeling.constrained.Matcher``)."""

    def accept(self, token_id: int) -> None: ...

    def is_finished(self) -> bool: ...




@dataclass(frozen=True, slots=True)
class Shaping:
    """What changes a sequence's logits before sampling (OpenAI's and vLLM's request fields); the defaults are off."""

    repetition_penalty: float = 1.0  # > 0: seen tokens' positive logits divided by it, negative multiplied
    presence_penalty: float = 0.0  # subtracted once from every token already in the completion
    frequency_penalty: float = 0.0  # subtracted per occurrence in the completion
    min_tokens: int = 0  # the stop ids are masked until this many tokens were produced
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                    or self.min_tokens > 0 or self.logit_bias)


NO_SHAPING = Shaping()
# Sets each row's disallowed tokens to -inf in place: (logits [R, V], [(row, matcher)]).
MaskFn = Callable[[Tensor, list[tuple[int, TokenMatcher]]], None]


@dataclass(frozen=True, slots=True)
class SequenceRequest:
    id: Hashable
    prompt_ids: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    shaping: Shaping = NO_SHAPING
    top_logprobs: int = 0  # alternatives reported per token (0 to 20)
    matcher: TokenMatcher | None = None  # a grammar the output must follow (a fresh state per sequence)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    id: Hashable
    token_id: int
    logprob: float
    # The top_logprobs most likely (token id, log-probability) at this position, most likely first.
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class FinishEvent:
    id: Hashable
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache (not computed)


Event = TokenEvent | FinishEvent


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    active: int  # sequences in the running batch
    queued: int  # requests waiting for a slot
    slots_in_use: int  # KV-cache slots held (one per active sequence)
    slots_total: int  # max_sequences
    prefix_blocks_used: int = 0  # prefix-cache blocks holding a cached prefix (0 without a prefix cache)
    prefix_blocks_total: int = 0  # the prefix cache's capacity in blocks


@dataclass(slots=True)
class _Sequence:
    req: SequenceRequest
    slot: int
    budget: int  # completion tokens allowed: min(max_tokens, max_context - prompt)
    generator: torch.Generator | None
    pos: int = 0  # absolute position of the pending token (the one the next decode feeds)
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    produced: dict[int, int] | None = None  # completion token id -> count, kept only when shaping needs it


PAD_FLOOR = 32  # rows of at most this many tokens always share a forward (padding them costs little)


def _length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of ``lengths`` in groups to prefill together: sorted by length, a group takes rows up to twice its
    shortest (or ``PAD_FLOOR``), so padding never more than doubles a group's work."""
    groups: list[list[int]] = []
    bound = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and lengths[i] <= bound:
            groups[-1].append(i)
        else:
            groups.append([i])
            bound = max(2 * lengths[i], PAD_FLOOR)
    return groups


class BatchScheduler:
    """Continuous batching over ``model`` with at most ``max_sequences`` sequences of ``max_context`` tokens."""

    def __init__(
        self, model: LlamaForCausalLM, *, max_sequences: int = 32, max_context: int | None = None,
        prefill_token_budget: int = 2048, apply_masks: MaskFn | None = None, prefix_cache_blocks: int = 0,
        prefix_block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        """``apply_masks``: ``inferplane.modeling.constrained.apply_masks`` (needed only by requests with a matcher).
        ``prefix_cache_blocks``: the prefix cache's budget in blocks of ``prefix_block_size`` tokens (0: none)."""
        self._apply_masks = apply_masks
        self.prefills_shared = 0  # sequences whose prompt was prefilled once for another sequence of the step
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
        self.prefix_cache = (PrefixCache(model, capacity=prefix_cache_blocks, block_size=prefix_block_size)
                             if prefix_cache_blocks > 0 else None)
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
        if req.matcher is not None and self._apply_masks is None:
            raise RequestRefused("this model instance has no constrained decoding")
        if any(not 0 <= t < vocab for t in req.shaping.logit_bias):
            raise RequestRefused(f"logit_bias token ids must be in [0, {vocab})")

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
        prefix = self.prefix_cache.stats if self.prefix_cache is not None else None
        return SchedulerStats(len(self._active), len(self._queue), in_use, self.max_sequences,
                              prefix.blocks_used if prefix else 0, prefix.blocks_total if prefix else 0)

    # ------------------------------------------------------------------ the stepping thread

    def step(self, early: Callable[[list[Event]], None] | None = None) -> list[Event]:
        """Cancel, admit (batched prefills), then advance every active sequence by one token in one forward.

        ``early``: given the events of the cancels and prefills (the admitted sequences' first tokens) before the
        decode forward runs, so that a caller on another thread can deliver them meanwhile (time to first token
        does not wait for the batch's decode); the returned events are then the decode's only."""
        events: list[Event] = []
        with torch.inference_mode():
            admitted = self._take_cancels_and_admissions(events)
            if admitted:
                self._prefill(admitted, events)
            if early is not None and events and self._active:
                early(events)
                events = []
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
            seq = _Sequence(req, heapq.heappop(self._free), budget, make_generator(req.sampling, device),
                            produced={} if req.shaping.active else None)
            seq.pos = len(req.prompt_ids)
            with self._lock:
                self._active[req.id] = seq
            self._slots[seq.slot] = seq
            seqs.append(seq)
        # A prompt admitted several times in this step (the n choices of one request) is prefilled once; its
        # keys are copied to the other slots and its logits shared (each sequence still samples on its own).
        firsts: dict[tuple[int, ...], int] = {}
        source = [firsts.setdefault(tuple(s.req.prompt_ids), i) for i, s in enumerate(seqs)]  # [n] -> unique row
        unique = [seqs[i] for i in firsts.values()]
        logits = self._prefill_unique(unique)  # [u, V]
        for i, s in enumerate(seqs):
            s.cached_tokens = seqs[source[i]].cached_tokens
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=device)  # [n]
        lengths = torch.tensor([s.pos for s in seqs], dtype=torch.long, device=device)  # [n]
        if len(unique) < len(seqs):
            row_of = {first: row for row, first in enumerate(firsts.values())}
            rows = [row_of[source[i]] for i in range(len(seqs))]
            copies = [(seqs[source[i]].slot, s.slot, s.pos) for i, s in enumerate(seqs) if source[i] != i]
            for src, dst, length in copies:
                self.model.copy_slots(torch.tensor([src], device=device), torch.tensor([dst], device=device), length)
            logits = logits[torch.tensor(rows, dtype=torch.long, device=device)]  # [n, V]
            self.prefills_shared += len(copies)
        tokens, chosen, top = self._sample(logits, list(enumerate(seqs)))  # [n], [n]
        self._tokens[slots] = tokens
        self._positions[slots] = lengths
        self._live[slots] = 1
        ids, lps = tokens.tolist(), chosen.tolist()
        for i, seq in enumerate(seqs):
            self._advance(seq, ids[i], lps[i], events, top.get(i, ()))

    def _prefill_unique(self, unique: list[_Sequence]) -> Tensor:
        """One batched prefill of distinct prompts into their slots; returns each one's last logits [u, V].

        With a prefix cache, each prompt's cached blocks are copied into its slot first and only the rest of it is
        computed (at its offset); afterwards its new full blocks are kept. A batch pads every row to its longest, so
        rows of very different lengths (a cache hit's few tokens beside a miss's whole prompt) go in forwards of
        their own (``_length_groups``): a hit does not pay for a miss's length.
        """
        device = self.model.device
        cache = self.prefix_cache
        matches = [cache.match(s.req.prompt_ids) for s in unique] if cache is not None else []
        offsets = [m.tokens for m in matches] or [0] * len(unique)
        if cache is not None:
            for s, m in zip(unique, matches, strict=True):
                cache.load(self.model, m, s.slot)
                s.cached_tokens = m.tokens
        rest = [list(s.req.prompt_ids[off:]) for s, off in zip(unique, offsets, strict=True)]
        rows: list[Tensor] = [torch.empty(0)] * len(unique)
        for group in _length_groups([len(r) for r in rest]):
            longest = max(len(rest[i]) for i in group)
            idx = torch.tensor([rest[i] + [0] * (longest - len(rest[i])) for i in group], dtype=torch.long,
                               device=device)  # [g, S]
            slots = torch.tensor([unique[i].slot for i in group], dtype=torch.long, device=device)  # [g]
            last = torch.tensor([len(rest[i]) - 1 for i in group], dtype=torch.long, device=device)  # [g]
            if any(offsets[i] for i in group):
                start = torch.tensor([offsets[i] for i in group], dtype=torch.long, device=device)  # [g]
                out = self.model.prefill_slots_at(idx, slots, start, last)  # [g, V]
            else:
                out = self.model.prefill_slots(idx, slots, last)  # [g, V]
            for j, i in enumerate(group):
                rows[i] = out[j]
        logits = torch.stack(rows)  # [u, V]
        if cache is not None:
            for s in unique:
                cache.store(self.model, s.req.prompt_ids, s.slot)
            for m in matches:  # after the stores: a block matched in this step is not evicted before its copy
                cache.release(m)
        return logits

    def _decode(self, events: list[Event]) -> None:
        active = list(self._active.values())
        hi = max(s.slot for s in active) + 1  # rows [0, hi); free rows below hi are holes
        end = max(s.pos for s in active) + 1  # keys any row may read
        logits = self.model.decode_rows(self._tokens[:hi], self._positions[:hi], end)  # [hi, V]
        tokens, chosen, top = self._sample(logits, [(s.slot, s) for s in active])  # [hi], [hi]
        self._tokens[:hi] = tokens
        self._positions[:hi] += self._live[:hi]  # holes stay at position 0
        ids, lps = tokens.tolist(), chosen.tolist()  # the step's one host sync
        for seq in active:
            seq.pos += 1
            self._advance(seq, ids[seq.slot], lps[seq.slot], events, top.get(seq.slot, ()))

    def _sample(self, logits: Tensor, rows: list[tuple[int, _Sequence]]) -> tuple[Tensor, Tensor, dict[int, list]]:
        """logits: [R, V]; rows: (row, sequence) pairs. Returns each row's token [R], its logprob [R], and per row
        that asked for them its top alternatives [(id, logprob)].

        Greedy rows share one argmax; a sampled row draws from its own generator, so a seeded request gets
        the same tokens whatever else runs. Logprobs are of the unmodified distribution (as OpenAI reports);
        shaping and grammar masks change only what is chosen.
        """
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)  # [R, V]
        chosen_from = logits
        shaped = [(row, seq) for row, seq in rows if seq.req.shaping.active]
        constrained = [(row, seq.req.matcher) for row, seq in rows if seq.req.matcher is not None]
        if shaped or constrained:
            chosen_from = logits.clone()
            for row, seq in shaped:
                self._shape(chosen_from[row], seq)
            if constrained:
                assert self._apply_masks is not None, "validate() refuses a matcher without apply_masks"
                self._apply_masks(chosen_from, constrained)
        tokens = torch.argmax(chosen_from, dim=-1)  # [R]
        for row, seq in rows:
            if not seq.req.sampling.greedy:
                probs = logits_to_probs(chosen_from[row], seq.req.sampling)  # [V]
                tokens[row] = torch.multinomial(probs, 1, generator=seq.generator)[0]
        top: dict[int, list] = {}
        wanting = [(row, seq.req.top_logprobs) for row, seq in rows if seq.req.top_logprobs > 0]
        if wanting:
            k = max(n for _, n in wanting)
            idx = torch.tensor([row for row, _ in wanting], dtype=torch.long, device=logits.device)
            values, ids = torch.topk(logprobs[idx], k, dim=-1)  # [W, k]
            for (row, n), vs, ts in zip(wanting, values.tolist(), ids.tolist(), strict=True):
                top[row] = list(zip(ts[:n], vs[:n], strict=True))
        return tokens, logprobs.gather(1, tokens[:, None])[:, 0], top

    def _shape(self, row: Tensor, seq: _Sequence) -> None:
        """One row's logits [V], in place: logit bias, penalties, and the stop ids masked before min_tokens."""
        shaping = seq.req.shaping
        if shaping.logit_bias:
            ids = torch.tensor(list(shaping.logit_bias), dtype=torch.long, device=row.device)
            row[ids] += torch.tensor(list(shaping.logit_bias.values()), dtype=row.dtype, device=row.device)
        produced = seq.produced or {}
        if shaping.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.req.prompt_ids) | produced.keys()), dtype=torch.long,
                                device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / shaping.repetition_penalty, vals * shaping.repetition_penalty)
        if produced and (shaping.presence_penalty or shaping.frequency_penalty):
            ids = torch.tensor(list(produced), dtype=torch.long, device=row.device)
            counts = torch.tensor(list(produced.values()), dtype=row.dtype, device=row.device)
            row[ids] -= shaping.presence_penalty + shaping.frequency_penalty * counts
        # min_tokens yields to a grammar: where only the end is allowed, masking it would leave no token at all
        if seq.completion_tokens < shaping.min_tokens and seq.req.stop_ids and seq.req.matcher is None:
            stop = [t for t in seq.req.stop_ids if 0 <= t < row.shape[-1]]
            row[torch.tensor(stop, dtype=torch.long, device=row.device)] = float("-inf")

    def _advance(self, seq: _Sequence, token: int, logprob: float, events: list[Event],
                 top: Sequence[tuple[int, float]] = ()) -> None:
        """Account one produced token: stop (not sent), send it, then maybe finish on length or a complete grammar."""
        seq.completion_tokens += 1
        if token in seq.req.stop_ids:
            self._finish(seq, "stop", events)
            return
        events.append(TokenEvent(seq.req.id, token, logprob, tuple(top)))
        if seq.produced is not None:
            seq.produced[token] = seq.produced.get(token, 0) + 1
        matcher = seq.req.matcher
        if matcher is not None:
            matcher.accept(token)
            if matcher.is_finished():
                self._finish(seq, "stop", events)
                return
        if seq.completion_tokens >= seq.budget:
            self._finish(seq, "length", events)

    def _finish(self, seq: _Sequence, reason: FinishReason, events: list[Event]) -> None:
        with self._lock:
            del self._active[seq.req.id]
        self._slots[seq.slot] = None
        self._live[seq.slot] = 0
        self._positions[seq.slot] = 0
        heapq.heappush(self._free, seq.slot)
        events.append(FinishEvent(seq.req.id, reason, len(seq.req.prompt_ids), seq.completion_tokens,
                                  seq.cached_tokens))
