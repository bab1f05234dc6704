"""Our Llama against Hugging Face ``transformers``' ``LlamaForCausalLM`` on the same weights (models/tiny-llama).

fp32 on the CPU. Tolerance: logits agree to ``LOGITS_ATOL`` = 1e-4 absolute (measured: <= 6e-6 on logits of
magnitude up to ~14, i.e. float32 rounding of differently ordered sums), for a full forward, for our
KV-cached single-sequence decode and for the continuous-batching scheduler's batched decode; greedy
generations are token-for-token identical. ``transformers`` is a test-only dependency.
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer

from inferplane.assets import TINY_LLAMA as ASSET_TINY_LLAMA
from inferplane.modeling.llama import LlamaForCausalLM, generate, load_model
from inferplane.modeling.llama.batching import BatchScheduler, SequenceRequest, TokenEvent
from tests.conftest import require

TINY_LLAMA = ASSET_TINY_LLAMA
LOGITS_ATOL = 1e-4
EOS = [1, 6]
TEXTS = [
    "Create a new",
    "Return the number of",
    "<s><|user|>What does dumps do?<|end|><|assistant|>",
    "If the value is not None,",
    ", ".join(str(i) for i in range(1, 60)),  # ~180 tokens
]


@pytest.fixture(scope="module")
def hf_model() -> Any:
    require(find_spec("transformers") is not None, "transformers is not installed (test-only dependency)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder; nothing may come from a hub
    from transformers import LlamaForCausalLM as HFLlama

    return HFLlama.from_pretrained(str(TINY_LLAMA), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours() -> LlamaForCausalLM:
    return load_model(TINY_LLAMA, dtype=torch.float32, progress=None)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tok = Tokenizer.from_file(str(TINY_LLAMA / "tokenizer.json"))
    return [tok.encode(t).ids for t in TEXTS]


def hf_logits(hf_model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([tokens])).logits[0].float()  # [S, V]


def test_full_forward_logits_agree(hf_model: Any, ours: LlamaForCausalLM, prompts: list[list[int]]) -> None:
    for tokens in prompts:
        with torch.inference_mode():
            mine = ours(torch.tensor([tokens]))[0]  # [S, V]
        torch.testing.assert_close(mine, hf_logits(hf_model, tokens), atol=LOGITS_ATOL, rtol=0)


def test_greedy_generation_is_identical(hf_model: Any, ours: LlamaForCausalLM, prompts: list[list[int]]) -> None:
    for tokens in prompts:
        with torch.inference_mode():
            out = hf_model.generate(torch.tensor([tokens]), max_new_tokens=48, do_sample=False, eos_token_id=EOS,
                                    pad_token_id=2)[0, len(tokens):].tolist()
        gen = generate(ours, tokens, max_tokens=48, stop_ids=EOS)
        mine = [s.token_id for s in gen]
        if gen.finish_reason == "stop":  # HF keeps the eos token it stopped on; we count it but do not send it
            assert out == [*mine, out[-1]] and out[-1] in EOS
        else:
            assert out == mine


def test_cached_and_batched_decode_logprobs_agree(
    hf_model: Any, ours: LlamaForCausalLM, prompts: list[list[int]],
) -> None:
    # Generate with the scheduler (all prompts in one running batch), then score prompt + completion with
    # HF in one full forward: each token's logprob must match HF's log_softmax at its position.
    scheduler = BatchScheduler(ours, max_sequences=8, max_context=512)
    for i, tokens in enumerate(prompts):
        scheduler.add(SequenceRequest(i, tokens, 32))
    got: dict[int, list[tuple[int, float]]] = {i: [] for i in range(len(prompts))}
    while scheduler.has_work():
        for ev in scheduler.step():
            if isinstance(ev, TokenEvent):
                assert isinstance(ev.id, int)
                got[ev.id].append((ev.token_id, ev.logprob))
    for i, tokens in enumerate(prompts):
        completion = [t for t, _ in got[i]]
        ref = torch.log_softmax(hf_logits(hf_model, tokens + completion), dim=-1)  # [S, V]
        positions = torch.arange(len(tokens) - 1, len(tokens) - 1 + len(completion))
        expected = ref[positions, torch.tensor(completion)]
        assert completion == ref[positions].argmax(-1).tolist(), "greedy in the batch = HF's argmax"
        torch.testing.assert_close(torch.tensor([lp for _, lp in got[i]]), expected, atol=LOGITS_ATOL, rtol=0)
