"""Next-token sampling: greedy at temperature 0, else temperature + top-k + top-p from a seeded generator."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None = a fresh random seed per request

    def __post_init__(self) -> None:
        assert self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"
        assert 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"
        assert self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """One generator per request, so a seeded request draws the same tokens whatever else runs."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def logits_to_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    # logits: [V] fp32 -> probs: [V] after temperature, top-k and top-p filtering
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # [V]
        cum = sorted_logits.softmax(-1).cumsum(-1)  # [V]
        # Drop a token once the mass before it already reaches top_p; the top token always survives.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[int, float]:
    """logits: [V] for the last position. Returns (token id, the model's log-probability of it).

    The log-probability is from the unmodified distribution (temperature 1, no filtering), as the
    OpenAI API reports it.
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # [V]
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        probs = logits_to_probs(logits, params)
        token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logprobs[token])
