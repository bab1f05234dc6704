"""Load a Hugging Face Llama-format checkpoint directory into ``LlamaForCausalLM``.

The directory holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json``. The model is built on the meta device and each tensor is read
straight onto the target device in the target dtype, so a full-size checkpoint never sits in host
memory twice.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from inferplane.modeling.llama.model import LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Old HF checkpoints saved the rotary buffer; it is recomputed from the config instead.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# (shard index, shard count, shard file name, seconds since start)
ProgressCallback = Callable[[int, int, str, float], None]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    assert name in DTYPES, f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}"
    return DTYPES[name]


def load_config(checkpoint_dir: str | Path) -> LlamaConfig:
    path = Path(checkpoint_dir) / "config.json"
    cfg = json.loads(path.read_text())
    model_type = cfg.get("model_type")
    assert model_type in (None, "llama"), f"{path}: model_type {model_type!r} is not 'llama'"
    return LlamaConfig.from_hf_dict(cfg)


def shard_files(checkpoint_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, in a stable order."""
    root = Path(checkpoint_dir)
    if (root / INDEX_FILE).exists():
        weight_map: dict[str, str] = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        return [root / name for name in sorted(set(weight_map.values()))]
    if (root / SINGLE_FILE).exists():
        return [root / SINGLE_FILE]
    raise FileNotFoundError(f"{root}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _log_progress(index: int, total: int, name: str, elapsed: float) -> None:
    log.info("loaded shard %d/%d %s (%.1fs)", index, total, name, elapsed)


def load_model(
    checkpoint_dir: str | Path,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: ProgressCallback | None = _log_progress,
) -> LlamaForCausalLM:
    """Build the model from ``config.json`` and fill it from the safetensors shards, in eval mode."""
    cfg = load_config(checkpoint_dir)
    dtype, device = parse_dtype(dtype), torch.device(device)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = set(model.state_dict().keys())
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")

    files = shard_files(checkpoint_dir)
    started, seen = time.monotonic(), set[str]()
    for i, path in enumerate(files, start=1):
        tensors = _read_shard(path, dtype=dtype, device=device)
        unexpected = set(tensors) - expected
        assert not unexpected, f"{path.name}: unexpected tensors {sorted(unexpected)[:5]}"
        # assign=True swaps the meta tensors for the loaded ones instead of copying into them.
        model.load_state_dict(tensors, strict=False, assign=True)
        seen |= set(tensors)
        if progress is not None:
            progress(i, len(files), path.name, time.monotonic() - started)

    missing = expected - seen
    assert not missing, f"{checkpoint_dir}: missing tensors {sorted(missing)[:5]} (+{max(0, len(missing) - 5)})"
    model.tie_weights()  # re-tie: assign=True replaced embed_tokens.weight with a new tensor
    model.reset_rope(device)
    model.requires_grad_(False)
    return model.eval()


def _read_shard(path: Path, *, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    # safetensors can place tensors on CUDA directly; for CPU "cpu" keeps it a zero-copy mmap read.
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for name in f.keys():
            if name.endswith(IGNORED_SUFFIXES):
                continue
            out[name] = f.get_tensor(name).to(dtype)
    return out


def save_checkpoint(
    model: LlamaForCausalLM, checkpoint_dir: str | Path, *, dtype: str | torch.dtype = torch.bfloat16,
    extra_config: dict[str, object] | None = None,
) -> None:
    """Write ``config.json`` + ``model.safetensors`` in Hugging Face Llama layout."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    dtype = parse_dtype(dtype)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; HF omits it too
    save_file(state, str(root / SINGLE_FILE), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(hf_config_dict(model.config, dtype, extra_config), indent=2))


def hf_config_dict(
    cfg: LlamaConfig, dtype: torch.dtype, extra: dict[str, object] | None = None,
) -> dict[str, object]:
    d: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    d.update(extra or {})
    return d
