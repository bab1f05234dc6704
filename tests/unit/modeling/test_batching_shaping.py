"""What changes the scheduler's choice of tokens per sequence (logit bias, penalties, min_tokens, a grammar's
mask) and what it reports besides the token (top log-probabilities), on the shipped tiny-llama in fp32.

The reference is the model's own forward: the log-softmax of the logits at each position of prompt + output.
"""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import torch
from tokenizers import Tokenizer

from inferplane.assets import TINY_LLAMA
from inferplane.modeling.llama import LlamaForCausalLM, SamplingParams, load_model
from inferplane.modeling.llama.batching import (
    BatchScheduler,
    FinishEvent,
    RequestRefused,
    SequenceRequest,
    Shaping,
    TokenEvent,
    TokenMatcher,
)

EOS = frozenset({1, 6})


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return load_model(TINY_LLAMA, progress=None)


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return Tokenizer.from_file(str(TINY_LLAMA / "tokenizer.json")).encode("Return the number of").ids


def run(scheduler: BatchScheduler, *reqs: SequenceRequest) -> tuple[dict[Hashable, list[TokenEvent]],
                                                                     dict[Hashable, FinishEvent]]:
    tokens: dict[Hashable, list[TokenEvent]] = {r.id: [] for r in reqs}
    finish: dict[Hashable, FinishEvent] = {}
    for r in reqs:
        scheduler.add(r)
    for _ in range(1000):
        if not scheduler.has_work():
            break
        for ev in scheduler.step():
            if isinstance(ev, TokenEvent):
                tokens[ev.id].append(ev)
            else:
                finish[ev.id] = ev
    return tokens, finish


def reference_logprobs(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits at every position of ``ids`` (one forward, a fresh cache)."""
    model.setup_caches(1, len(ids))
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), torch.arange(len(ids)))[0]  # [S, V]
    return torch.log_softmax(logits.float(), dim=-1)


def test_top_logprobs_are_the_models_distribution(model: LlamaForCausalLM, prompt: list[int]) -> None:
    s = BatchScheduler(model, max_sequences=4, max_context=128)
    tokens, finish = run(s, SequenceRequest("a", prompt, 8, stop_ids=EOS, top_logprobs=5),
                         SequenceRequest("b", prompt, 8, stop_ids=EOS))
    assert finish["a"].reason == "length" and len(tokens["a"]) == 8
    assert all(ev.top == () for ev in tokens["b"])  # only the sequence that asked
    out = [ev.token_id for ev in tokens["a"]]
    ref = reference_logprobs(model, prompt + out)
    for i, ev in enumerate(tokens["a"]):
        row = ref[len(prompt) - 1 + i]
        assert ev.logprob == pytest.approx(float(row[ev.token_id]), abs=1e-4)
        values, ids = torch.topk(row, 5)
        assert [t for t, _ in ev.top] == ids.tolist()
        assert [v for _, v in ev.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert ev.top[0][0] == ev.token_id  # greedy: the chosen token is the most likely


def test_logit_bias_forces_and_bans(model: LlamaForCausalLM, prompt: list[int]) -> None:
    s = BatchScheduler(model, max_sequences=2, max_context=128)
    tokens, _ = run(s, SequenceRequest("a", prompt, 4, stop_ids=EOS, shaping=Shaping(logit_bias={42: 100.0})))
    assert [ev.token_id for ev in tokens["a"]] == [42] * 4
    free, _ = run(s, SequenceRequest("f", prompt, 1, stop_ids=EOS))
    first = free["f"][0].token_id
    banned, _ = run(s, SequenceRequest("b", prompt, 1, stop_ids=EOS,
                                       shaping=Shaping(logit_bias={first: -100.0})))
    assert banned["b"][0].token_id != first
    with pytest.raises(RequestRefused):
        s.add(SequenceRequest("x", prompt, 1, shaping=Shaping(logit_bias={10**6: 1.0})))


def test_min_tokens_masks_the_stop_ids(model: LlamaForCausalLM, prompt: list[int]) -> None:
    s = BatchScheduler(model, max_sequences=2, max_context=128)
    # Every token but the first 20 ids stopped: without min_tokens the first token (not an id below 20) ends it.
    stops = frozenset(range(20, 4096))
    _, finish = run(s, SequenceRequest("a", prompt, 10, stop_ids=stops))
    assert finish["a"].reason == "stop" and finish["a"].completion_tokens == 1
    tokens, finish = run(s, SequenceRequest("b", prompt, 10, stop_ids=stops, shaping=Shaping(min_tokens=5)))
    assert len(tokens["b"]) >= 5 and all(ev.token_id < 20 for ev in tokens["b"])


def test_frequency_penalty_breaks_a_loop(model: LlamaForCausalLM) -> None:
    loop = Tokenizer.from_file(str(TINY_LLAMA / "tokenizer.json")).encode("-" * 20).ids
    s = BatchScheduler(model, max_sequences=2, max_context=128)
    plain, _ = run(s, SequenceRequest("a", loop, 16, stop_ids=EOS))
    penalised, _ = run(s, SequenceRequest("b", loop, 16, stop_ids=EOS,
                                          shaping=Shaping(frequency_penalty=2.0, presence_penalty=2.0)))
    distinct = lambda evs: len({ev.token_id for ev in evs})  # noqa: E731
    assert distinct(penalised["b"]) > distinct(plain["a"])
    repeated, _ = run(s, SequenceRequest("c", loop, 16, stop_ids=EOS, shaping=Shaping(repetition_penalty=5.0)))
    assert {ev.token_id for ev in repeated["c"]}.isdisjoint(loop)


class EvenOnly:
    """A stand-in grammar (this test is about the scheduler's use of a matcher): only even ids, finished after 3."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def accept(self, token_id: int) -> None:
        assert token_id % 2 == 0, token_id
        self.seen.append(token_id)

    def is_finished(self) -> bool:
        return len(self.seen) == 3


def mask_odd(logits: torch.Tensor, rows: list[tuple[int, TokenMatcher]]) -> None:
    for row, _ in rows:
        logits[row, 1::2] = float("-inf")


def test_a_matcher_masks_its_row_only_and_ends_the_sequence(model: LlamaForCausalLM, prompt: list[int]) -> None:
    with pytest.raises(RequestRefused):
        BatchScheduler(model, max_sequences=2, max_context=128).add(
            SequenceRequest("x", prompt, 5, matcher=EvenOnly()))
    s = BatchScheduler(model, max_sequences=4, max_context=128, apply_masks=mask_odd)
    matcher = EvenOnly()
    tokens, finish = run(s, SequenceRequest("c", prompt, 10, stop_ids=EOS, matcher=matcher,
                                            sampling=SamplingParams(temperature=1.0, seed=3)),
                         SequenceRequest("f", prompt, 10, stop_ids=EOS))
    assert [ev.token_id for ev in tokens["c"]] == matcher.seen and len(matcher.seen) == 3
    assert finish["c"].reason == "stop" and finish["c"].completion_tokens == 3
    assert any(ev.token_id % 2 for ev in tokens["f"])  # the free row was not masked


def test_a_prompt_admitted_twice_is_prefilled_once(model: LlamaForCausalLM, prompt: list[int]) -> None:
    def req(rid: str, seed: int) -> SequenceRequest:
        return SequenceRequest(rid, prompt, 12, SamplingParams(temperature=1.0, seed=seed), EOS)

    alone = BatchScheduler(model, max_sequences=4, max_context=128)
    solo = {rid: run(alone, req(rid, seed))[0][rid] for rid, seed in (("a", 1), ("b", 2))}
    assert alone.prefills_shared == 0
    shared = BatchScheduler(model, max_sequences=4, max_context=128)
    together, _ = run(shared, req("a", 1), req("b", 2))
    assert shared.prefills_shared == 1  # b's slot got a's keys
    for rid in ("a", "b"):  # the same tokens and logprobs as each alone
        assert [ev.token_id for ev in together[rid]] == [ev.token_id for ev in solo[rid]]
        assert [ev.logprob for ev in together[rid]] == pytest.approx([ev.logprob for ev in solo[rid]], abs=1e-4)
