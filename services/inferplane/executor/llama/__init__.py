"""A small torch Llama for the executor's Triton model: model, HF checkpoint loader, sampling, generation."""

from inferplane.executor.llama.generate import FinishReason, Generation, TokenStep, generate
from inferplane.executor.llama.loader import load_config, load_model, save_checkpoint
from inferplane.executor.llama.model import LlamaConfig, LlamaForCausalLM, count_parameters
from inferplane.executor.llama.sampling import SamplingParams

__all__ = [
    "FinishReason",
    "Generation",
    "LlamaConfig",
    "LlamaForCausalLM",
    "SamplingParams",
    "TokenStep",
    "count_parameters",
    "generate",
    "load_config",
    "load_model",
    "save_checkpoint",
]
