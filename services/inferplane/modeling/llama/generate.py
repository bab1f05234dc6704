"""Token-by-token generation for one sequence: prefill, then a decode_one_token loop.

``generate()`` returns a ``Generation``: iterate it for the produced tokens; afterwards it holds the
finish reason and the token counts. A stop token ends the stream and is *not* yielded (as OpenAI leaves
stop sequences out of the text), but it was produced by the model, so it is counted in
``completion_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from inferplane.modeling.llama.model import LlamaForCausalLM
from inferplane.modeling.llama.sampling import SamplingParams, make_generator, sample

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class TokenStep:
    token_id: int
    logprob: float


def prefill(model: LlamaForCausalLM, prompt: Tensor) -> Tensor:
    # prompt: [S] -> logits of the last position [V]
    input_pos = torch.arange(prompt.shape[0], device=prompt.device)  # [S]
    return model(prompt[None, :], input_pos)[0, -1]  # [V]


def decode_one_token(model: LlamaForCausalLM, token: int, pos: int) -> Tensor:
    # one token at absolute position `pos` -> logits [V]
    device = model.device
    idx = torch.tensor([[token]], dtype=torch.long, device=device)  # [1, 1]
    input_pos = torch.tensor([pos], dtype=torch.long, device=device)  # [1]
    return model(idx, input_pos)[0, -1]  # [V]


class Generation:
    """One generation call. Iterate once; then read ``finish_reason`` and the token counts."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        sampling: SamplingParams,
        stop_ids: Iterable[int],
        max_context: int,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> None:
        assert prompt_ids, "prompt_ids must not be empty"
        assert max_tokens >= 1, f"max_tokens must be >= 1, got {max_tokens}"
        assert max_context <= model.config.max_position_embeddings, (
            f"max_context {max_context} exceeds max_position_embeddings {model.config.max_position_embeddings}"
        )
        assert len(prompt_ids) < max_context, (
            f"prompt of {len(prompt_ids)} tokens leaves no room in a context of {max_context}"
        )
        self.model, self.prompt_ids = model, list(prompt_ids)
        self.max_tokens, self.sampling = max_tokens, sampling
        self.stop_ids, self.max_context = frozenset(stop_ids), max_context
        self.is_cancelled = is_cancelled or (lambda: False)
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None

    def __iter__(self) -> Iterator[TokenStep]:
        assert self.finish_reason is None, "a Generation can be iterated only once"
        with torch.inference_mode():
            yield from self._run()

    def _budget(self) -> int:
        # Prompt + completion must fit the context, as max_model_len works in vLLM.
        return min(self.max_tokens, self.max_context - self.prompt_tokens)

    def _run(self) -> Iterator[TokenStep]:
        model, budget = self.model, self._budget()
        # The last produced token is never fed back, so the cache needs one slot less than the total.
        model.setup_caches(1, self.prompt_tokens + budget - 1)
        generator = make_generator(self.sampling, model.device)
        prompt = torch.tensor(self.prompt_ids, dtype=torch.long, device=model.device)  # [S]

        if self.is_cancelled():
            self.finish_reason = "cancelled"
            return
        logits = prefill(model, prompt)  # [V]
        pos = self.prompt_tokens
        while True:
            token, logprob = sample(logits, self.sampling, generator)
            self.completion_tokens += 1
            if token in self.stop_ids:
                self.finish_reason = "stop"
                return
            yield TokenStep(token, logprob)
            if self.completion_tokens >= budget:
                self.finish_reason = "length"
                return
            if self.is_cancelled():
                self.finish_reason = "cancelled"
                return
            logits = decode_one_token(model, token, pos)
            pos += 1


def generate(
    model: LlamaForCausalLM,
    prompt_ids: list[int],
    *,
    max_tokens: int,
    sampling: SamplingParams | None = None,
    stop_ids: Iterable[int] = (),
    max_context: int | None = None,
    is_cancelled: Callable[[], bool] | None = None,
) -> Generation:
    """Generate up to ``max_tokens`` after ``prompt_ids``; stops on a stop id, the context end or cancel.

    ``stop_ids`` should include the model's eos ids; ``max_context`` defaults to max_position_embeddings.
    """
    return Generation(
        model, prompt_ids, max_tokens=max_tokens, sampling=sampling or SamplingParams(),
        stop_ids=stop_ids, max_context=max_context or model.config.max_position_embeddings,
        is_cancelled=is_cancelled,
    )

