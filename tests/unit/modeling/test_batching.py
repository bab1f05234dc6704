"""The continuous-batching scheduler (services/inferplane/modeling/llama/batching.py) on the shipped tiny-llama.

fp32 on the CPU. A sequence's logits in a batch differ from its logits alone only by rounding (other
matmul shapes), far below the gaps between the top tokens of these prompts, so greedy tokens must be
identical; seeded sampling draws from each request's own generator, so its tokens must be identical too.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import pytest
import torch
from tokenizers import Tokenizer

from inferplane.assets import TINY_LLAMA as ASSET_TINY_LLAMA
from inferplane.modeling.llama import LlamaForCausalLM, SamplingParams, generate, load_model
from inferplane.modeling.llama.batching import (
    BatchScheduler,
    Event,
    FinishEvent,
    RequestRefused,
    SequenceRequest,
    TokenEvent,
)

TINY_LLAMA = ASSET_TINY_LLAMA
EOS = frozenset({1, 6})
TEXTS = [
    "Create a new",
    "Return the number of",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "-" * 20,
    ">>> x = 1\n>>> x = 2\n>>> x = 3\n>>>",
    "If the value is not None,",
    "Return a list of the given name. The optional argument is a string, the number of the value of",
    "<s><|user|>What does dumps do?<|end|><|assistant|>",
]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return load_model(TINY_LLAMA, progress=None)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tok = Tokenizer.from_file(str(TINY_LLAMA / "tokenizer.json"))
    return [tok.encode(t).ids for t in TEXTS]


class Run:
    """Drive a scheduler to completion, adding requests at given steps; collect tokens and finishes."""

    def __init__(self, scheduler: BatchScheduler) -> None:
        self.s = scheduler
        self.tokens: dict[Hashable, list[int]] = {}
        self.logprobs: dict[Hashable, list[float]] = {}
        self.finish: dict[Hashable, FinishEvent] = {}
        self.steps = 0

    def take(self, events: Iterable[Event]) -> None:
        for ev in events:
            if isinstance(ev, TokenEvent):
                assert ev.id not in self.finish, "a token after the finish"
                self.tokens.setdefault(ev.id, []).append(ev.token_id)
                self.logprobs.setdefault(ev.id, []).append(ev.logprob)
            else:
                assert ev.id not in self.finish, "two finishes"
                self.finish[ev.id] = ev

    def step(self) -> list[Event]:
        events = self.s.step()
        self.take(events)
        self.steps += 1
        return events

    def until_done(self, schedule: dict[int, list[SequenceRequest]] | None = None, limit: int = 10_000) -> Run:
        schedule = dict(schedule or {})
        while schedule or self.s.has_work():
            for req in schedule.pop(self.steps, []):
                self.s.add(req)
            self.step()
            assert self.steps < limit
        return self


def alone(model: LlamaForCausalLM, req: SequenceRequest) -> tuple[list[int], FinishEvent]:
    run = Run(BatchScheduler(model, max_sequences=1, max_context=256)).until_done({0: [req]})
    return run.tokens.get(req.id, []), run.finish[req.id]


def test_alone_equals_generate(model: LlamaForCausalLM, prompts: list[list[int]]) -> None:
    for i, prompt in enumerate(prompts[:4]):
        gen = generate(model, prompt, max_tokens=40, stop_ids=EOS, max_context=256)
        ref = [s.token_id for s in gen]
        tokens, fin = alone(model, SequenceRequest(i, prompt, 40, stop_ids=EOS))
        assert tokens == ref
        assert (fin.reason, fin.prompt_tokens, fin.completion_tokens) == (
            gen.finish_reason, gen.prompt_tokens, gen.completion_tokens)


@pytest.mark.parametrize("n", [8, 32])
def test_batch_equals_alone_with_joins_at_different_steps(
    model: LlamaForCausalLM, prompts: list[list[int]], n: int,
) -> None:
    # n mixed-length sequences, mixed max_tokens, joining over the first steps, some stopping on eos early;
    # every 4th one samples with its own seed. The batch never holds more than max_sequences = 32.
    def request(i: int) -> SequenceRequest:
        seeded = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=100 + i)
        sampling = seeded if i % 4 == 3 else SamplingParams()
        return SequenceRequest(i, prompts[i % len(prompts)], 24 + 7 * (i % 5), sampling, EOS)

    reqs = [request(i) for i in range(n)]
    schedule: dict[int, list[SequenceRequest]] = {}
    for i, req in enumerate(reqs):
        schedule.setdefault((i * 3) % 11, []).append(req)
    run = Run(BatchScheduler(model, max_sequences=32, max_context=256)).until_done(schedule)
    for req in reqs:
        ref_tokens, ref_fin = alone(model, req)
        assert run.tokens.get(req.id, []) == ref_tokens, f"request {req.id} differs in the batch"
        assert run.finish[req.id] == ref_fin
    reasons = {f.reason for f in run.finish.values()}
    assert reasons == {"stop", "length"}, "precondition: the mix has both eos stops and max_tokens ends"
    assert run.s.stats.slots_in_use == 0 and run.s.stats.active == 0


def test_batched_logprobs_match_alone(model: LlamaForCausalLM, prompts: list[list[int]]) -> None:
    reqs = [SequenceRequest(i, p, 12, stop_ids=EOS) for i, p in enumerate(prompts)]
    run = Run(BatchScheduler(model, max_sequences=8, max_context=256)).until_done({0: reqs})
    for req in reqs:
        gen = generate(model, list(req.prompt_ids), max_tokens=12, stop_ids=EOS)
        ref = [s.logprob for s in gen]
        torch.testing.assert_close(torch.tensor(run.logprobs[req.id]), torch.tensor(ref), atol=1e-4, rtol=0)


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(
    model: LlamaForCausalLM, prompts: list[list[int]],
) -> None:
    def req(rid: int, seed: int) -> SequenceRequest:
        sampling = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=seed)
        return SequenceRequest(rid, prompts[0], 30, sampling, EOS)

    ref, _ = alone(model, req(0, 7))
    assert alone(model, req(0, 7))[0] == ref
    assert alone(model, req(0, 8))[0] != ref
    # The same seeded request among greedy and other seeded ones, joining mid-way.
    others = [SequenceRequest(10 + i, p, 30, SamplingParams(), EOS) for i, p in enumerate(prompts)]
    run = Run(BatchScheduler(model, max_sequences=16, max_context=256)).until_done(
        {0: [*others[:4], req(1, 8)], 3: [req(2, 7)], 5: others[4:]})
    assert run.tokens[2] == ref
    assert run.tokens[1] == alone(model, req(1, 8))[0]


def test_generate_and_scheduler_sample_alike(model: LlamaForCausalLM, prompts: list[list[int]]) -> None:
    sampling = SamplingParams(temperature=0.7, top_k=20, seed=3)
    gen = [s.token_id for s in generate(model, prompts[1], max_tokens=20, sampling=sampling, stop_ids=EOS)]
    assert alone(model, SequenceRequest(0, prompts[1], 20, sampling, EOS))[0] == gen


def test_cancel_frees_the_slot_within_one_step(model: LlamaForCausalLM, prompts: list[list[int]]) -> None:
    s = BatchScheduler(model, max_sequences=2, max_context=256)
    run = Run(s)
    for i in range(3):
        s.add(SequenceRequest(i, prompts[2], 200))
    run.step()
    assert (s.stats.active, s.stats.queued, s.stats.slots_in_use, s.stats.slots_total) == (2, 1, 2, 2)
    before = len(run.tokens[0])
    s.cancel(0)
    events = run.step()  # the very next step: 0 leaves, 2 takes its slot, 1 and 2 decode
    assert run.finish[0] == FinishEvent(0, "cancelled", len(prompts[2]), before)
    assert len(run.tokens[0]) == before, "no token after the cancel"
    assert events[0] == run.finish[0], "the cancel is the first thing the step does"
    assert (s.stats.active, s.stats.queued, s.stats.slots_in_use) == (2, 0, 2)
    assert 2 in run.tokens, "the queued request joined in the slot the cancel freed"
    s.cancel(1)
    s.cancel(2)
    run.step()
    assert s.stats.slots_in_use == 0 and not s.has_work()
    assert {run.finish[i].reason for i in (1, 2)} == {"cancelled"}


def test_cancel_of_a_queued_request_and_cancel_all(model: LlamaForCausalLM, prompts: list[list[int]]) -> None:
    s = BatchScheduler(model, max_sequences=1, max_context=256)
    run = Run(s)
    for i in range(3):
        s.add(SequenceRequest(i, prompts[0], 100))
    s.cancel(2)
    run.step()
    assert run.finish[2] == FinishEvent(2, "cancelled", len(prompts[0]), 0)
    assert s.stats.queued == 1
    s.cancel_all()
    run.step()
    assert {run.finish[i].reason for i in (0, 1)} == {"cancelled"} and not s.has_work()
    assert run.finish[1].completion_tokens == 0


def test_requests_beyond_the_cap_wait_in_fifo_order(model: LlamaForCausalLM, prompts: list[list[int]]) -> None:
    s = BatchScheduler(model, max_sequences=2, max_context=256)
    run = Run(s)
    first_token_step: dict[Hashable, int] = {}
    for i in range(6):
        s.add(SequenceRequest(i, prompts[i % 3], 5 + i))
    while s.has_work():
        run.step()
        assert s.stats.active <= 2
        for rid in run.tokens:
            first_token_step.setdefault(rid, run.steps)
    order = sorted(first_token_step, key=lambda r: (first_token_step[r], r))
    assert order == list(range(6))
    assert all(run.finish[i].reason == "length" and run.finish[i].completion_tokens == 5 + i for i in range(6))


def test_freed_low_slots_are_reused_first(model: LlamaForCausalLM, prompts: list[list[int]]) -> None:
    s = BatchScheduler(model, max_sequences=4, max_context=256)
    run = Run(s)
    # Slots 0 and 1 end soon, 2 and 3 run on: rows 0-1 become holes below the highest slot in use.
    for i, n in enumerate([2, 3, 40, 40]):
        s.add(SequenceRequest(i, prompts[2], n))
    while len(run.finish) < 2:
        run.step()
    assert s.stats.slots_in_use == 2
    s.add(SequenceRequest(9, prompts[1], 10, stop_ids=EOS))
    run.until_done()
    assert run.tokens[9] == alone(model, SequenceRequest(9, prompts[1], 10, stop_ids=EOS))[0]
    assert run.tokens[2] == alone(model, SequenceRequest(2, prompts[2], 40))[0]


def test_stop_ids_max_tokens_and_context_end(model: LlamaForCausalLM, prompts: list[list[int]]) -> None:
    free = alone(model, SequenceRequest(0, prompts[2], 30))[0]
    stop = free[5]
    tokens, fin = alone(model, SequenceRequest(0, prompts[2], 30, stop_ids=frozenset({stop})))
    assert tokens == free[: free.index(stop)]
    assert fin.reason == "stop" and fin.completion_tokens == free.index(stop) + 1  # counted, not sent
    tokens, fin = alone(model, SequenceRequest(0, prompts[2], 1))
    assert tokens == free[:1] and fin.reason == "length"
    # The context end: prompt + completion = max_context.
    s = BatchScheduler(model, max_sequences=2, max_context=len(prompts[2]) + 4)
    run = Run(s).until_done({0: [SequenceRequest(0, prompts[2], 100)]})
    assert run.tokens[0] == free[:4]
    assert run.finish[0] == FinishEvent(0, "length", len(prompts[2]), 4)


def test_prefill_budget_spreads_a_burst_of_arrivals(model: LlamaForCausalLM, prompts: list[list[int]]) -> None:
    s = BatchScheduler(model, max_sequences=8, max_context=256, prefill_token_budget=3 * len(prompts[2]))
    run = Run(s)
    for i in range(8):
        s.add(SequenceRequest(i, prompts[2], 50))
    run.step()
    assert (s.stats.active, s.stats.queued) == (3, 5)
    run.step()
    assert (s.stats.active, s.stats.queued) == (6, 2)


def test_refused_requests(model: LlamaForCausalLM) -> None:
    s = BatchScheduler(model, max_sequences=2, max_context=16)
    cases = [
        (SequenceRequest(0, [], 5), "input_ids must not be empty"),
        (SequenceRequest(0, [5] * 16, 5), "does not fit the context of 16"),
        (SequenceRequest(0, [5, 6], 0), "max_tokens must be >= 1"),
        (SequenceRequest(0, [5, 4096], 3), r"input_ids must be in \[0, 4096\)"),
    ]
    for req, message in cases:
        with pytest.raises(RequestRefused, match=message):
            s.add(req)
    s.add(SequenceRequest("a", [5, 6], 3))
    with pytest.raises(RequestRefused, match="already in use"):
        s.add(SequenceRequest("a", [5, 6], 3))
    assert s.stats.queued == 1


def test_wait_for_work(model: LlamaForCausalLM) -> None:
    s = BatchScheduler(model, max_sequences=1, max_context=16)
    assert not s.wait_for_work(0.01)
    s.add(SequenceRequest(0, [5, 6], 2))
    assert s.wait_for_work(0.01)
