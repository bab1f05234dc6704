"""A small torch Llama for the LLM Triton model: model, HF checkpoint loader, sampling, generation, batching."""

from inferplane.modeling.llama.generate import FinishReason, Generation, TokenStep, generate
from inferplane.modeling.llama.loader import load_config, load_model, save_checkpoint
from inferplane.modeling.llama.model import LlamaConfig, LlamaForCausalLM, count_parameters
from inferplane.modeling.llama.sampling import SamplingParams

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
