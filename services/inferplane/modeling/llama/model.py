"""A Llama decoder in plain torch, laid out like gpt-fast but with Hugging Face parameter names.

Module names mirror ``LlamaForCausalLM`` (``model.layers.{i}.self_attn.q_proj`` ...), so a Hugging Face
state dict loads with ``load_state_dict`` and no renaming. Rotary embeddings use HF's ``rotate_half``
convention (first half / second half of each head, not interleaved pairs), which is what HF checkpoints
expect after their q/k permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LlamaConfig:
    """The subset of Hugging Face's ``LlamaConfig`` this implementation uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        assert self.num_attention_heads % self.num_key_value_heads == 0, (
            f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({self.num_key_value_heads})"
        )
        assert self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}"

    @property
    def n_kv_heads(self) -> int:
        assert self.num_key_value_heads is not None
        return self.num_key_value_heads

    @property
    def d_head(self) -> int:
        assert self.head_dim is not None
        return self.head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from a parsed ``config.json``; unknown keys are kept in ``extra``."""
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)


def rope_inv_freq(cfg: LlamaConfig) -> Tensor:
    """Rotary inverse frequencies [D/2], with Llama 3's frequency-dependent scaling when configured."""
    d = cfg.d_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # [D/2]
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / float(scaling["factor"])).float()
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return torch.where(is_mid, mid, scaled).float()
    raise NotImplementedError(f"rope_scaling type {kind!r} is not supported")


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, H, S, D]; cos, sin: [S, D] (positions shared by the rows) or [B, 1, 1, D] (one per row)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class KVCache(nn.Module):
    """A preallocated static cache, one row (slot) per sequence: [B, H_kv, max_seq_len, D].

    ``generate()`` uses it with B = 1; the continuous-batching scheduler (``llama/batching.py``) with
    B = max_sequences, where row b is slot b and holds its sequence's keys at positions [0, length).
    """

    def __init__(
        self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int, *, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.k: Tensor
        self.v: Tensor

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, attn: AttnSpan) -> tuple[Tensor, Tensor]:
        # k, v: [B, H_kv, S, D] for the cache rows attn.rows; returns the keys and values to attend to
        if isinstance(attn.rows, Tensor) and attn.local:  # a batched prefill from 0 into the slots attn.rows: [B]
            self.k[attn.rows, :, : k.shape[2]] = k
            self.v[attn.rows, :, : v.shape[2]] = v
            return k, v  # a prefill from 0 attends to its own keys only: no need to read them back
        if isinstance(attn.rows, Tensor):  # a batched prefill of slots attn.rows, row b from its own offset
            assert attn.write_positions is not None, "a batched prefill at offsets needs its write positions"
            rows = attn.rows[:, None]  # [B, 1] with write_positions [B, S]: the cache cells [B, S, H_kv, D]
            self.k[rows, :, attn.write_positions] = k.transpose(1, 2)
            self.v[rows, :, attn.write_positions] = v.transpose(1, 2)
            return self.k[attn.rows, :, : attn.end], self.v[attn.rows, :, : attn.end]  # [B, H_kv, T, D]
        k_rows, v_rows = self.k[attn.rows], self.v[attn.rows]  # views [B, H_kv, max_seq_len, D]
        if attn.write_index is None:  # every row writes the same positions input_pos: [S]
            k_rows.index_copy_(2, input_pos, k)
            v_rows.index_copy_(2, input_pos, v)
        else:  # one token per row, each at its own position (batched decode)
            k_rows.scatter_(2, attn.write_index, k)
            v_rows.scatter_(2, attn.write_index, v)
        if attn.local:
            return k, v
        return k_rows[:, :, : attn.end], v_rows[:, :, : attn.end]


@dataclass(frozen=True)
class AttnSpan:
    """Which cache rows and keys a forward uses, worked out once per forward rather than once per layer."""

    end: int  # keys [0, end) of the cache (the sequence length without a cache)
    # [S, T] or [B, 1, 1, T] bool (True = attend), or None: causal for S > 1, everything for S == 1
    mask: Tensor | None
    # The cache rows (slots) this forward reads and writes: a slice, or [B] slot ids for a batched prefill.
    rows: slice | Tensor = field(default_factory=lambda: slice(None))
    write_index: Tensor | None = None  # [B, H_kv, 1, D] per-row write positions of a batched decode
    local: bool = False  # a prefill from position 0: attend to this forward's own keys, not the cache's
    write_positions: Tensor | None = None  # [B, S] cache positions of a batched prefill at per-row offsets

    @staticmethod
    def of(seqlen: int, input_pos: Tensor | None, rows: slice = slice(None)) -> AttnSpan:
        if input_pos is None:  # full-sequence forward without a cache
            return AttnSpan(seqlen, None, rows)
        end = int(input_pos[-1]) + 1  # the one host sync of a step
        if seqlen == end:  # a prefill from position 0 (or a first token): causal over its own keys
            return AttnSpan(end, None, rows, local=True)
        if seqlen == 1:  # a decode step: everything in the cache up to end
            return AttnSpan(end, None, rows)
        mask = torch.arange(end, device=input_pos.device) <= input_pos[:, None]  # [S, T]
        return AttnSpan(end, mask, rows)

    @staticmethod
    def per_row(positions: Tensor, end: int, n_kv_heads: int, head_dim: int) -> AttnSpan:
        """A one-token decode of rows [0, B), row b at ``positions[b]``; ``end`` > max(positions)."""
        bsz = positions.shape[0]
        mask = torch.arange(end, device=positions.device)[None, :] <= positions[:, None]  # [B, T]
        index = positions.view(bsz, 1, 1, 1).expand(bsz, n_kv_heads, 1, head_dim)  # [B, H_kv, 1, D]
        return AttnSpan(end, mask.view(bsz, 1, 1, end), slice(0, bsz), index)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op, same arithmetic
        # Normalise in fp32 as HF does: bf16 variance loses too much precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.n_kv_heads, cfg.d_head
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, attn: AttnSpan) -> Tensor:
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
        v = self.v_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if input_pos is not None:
            assert self.kv_cache is not None, "call setup_caches() before a forward with input_pos"
            k, v = self.kv_cache.update(input_pos, k, v, attn)  # [B, Hkv, T, D], T = end

        groups = self.n_heads // self.n_kv_heads
        if seqlen == 1:
            # Decode: the G query heads of each kv head become G query rows against that head's keys, so
            # grouped-query attention reads the cache in place instead of copying it G times.
            q = q.view(bsz, self.n_kv_heads, groups, self.head_dim)  # [B, Hkv, G, D]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask)  # [B, Hkv, G, D]
            return self.o_proj(y.reshape(bsz, 1, self.n_heads * self.head_dim))
        if groups > 1:  # prefill: each kv head serves n_heads / n_kv_heads query heads
            k = k.repeat_interleave(groups, dim=1)  # [B, H, T, D]
            v = v.repeat_interleave(groups, dim=1)  # [B, H, T, D]
        causal = attn.mask is None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask, is_causal=causal)  # [B, H, S, D]
        y = y.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim)  # [B, S, H*D]
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, attn: AttnSpan) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, attn)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.inv_freq: Tensor

    def reset_rope(self, device: torch.device | str) -> None:
        """Recompute the rotary buffer: needed after building on the meta device."""
        self.inv_freq = rope_inv_freq(self.config).to(device)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def setup_caches(self, batch_size: int, max_seq_len: int) -> None:
        """Allocate a fresh static KV cache [batch_size, H_kv, max_seq_len, D] in every layer."""
        assert max_seq_len <= self.config.max_position_embeddings, (
            f"cache of {max_seq_len} exceeds max_position_embeddings {self.config.max_position_embeddings}"
        )
        if self.device.type == "cuda":
            # Measured on an H200 (torch 2.11, bench.gpu_model + torch.profiler): with the masked decode shapes the
            # cuDNN SDPA backend spent 10.6 ms of CPU per attention call, 90 % of a decode step whose GPU work took
            # 0.4 ms; the flash, memory-efficient and math backends do not.
            torch.backends.cuda.enable_cudnn_sdp(False)
        for layer in self.model.layers:
            assert isinstance(layer, LlamaDecoderLayer)
            layer.self_attn.kv_cache = KVCache(
                batch_size, self.config.n_kv_heads, max_seq_len, self.config.d_head,
                dtype=self.dtype, device=self.device,
            )

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        # positions: [S] -> cos, sin: [S, D], computed in fp32 for every call (cheap, no table to size)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(
        self, idx: Tensor, input_pos: Tensor | None = None, *, slot: int | None = None, last_only: bool = False,
    ) -> Tensor:
        """idx: [B, S] token ids; input_pos: [S] absolute positions (uses the KV cache) or None.

        ``slot`` (with B = 1) writes and reads cache row ``slot`` instead of rows [0, B): a prefill into
        one slot of the batching scheduler's cache. ``last_only`` computes logits for the last position only.
        Returns logits [B, S, V] (S = 1 with ``last_only``) in the model's dtype.
        """
        assert slot is None or idx.shape[0] == 1, "a forward into one slot takes one sequence"
        rows = slice(None) if slot is None else slice(slot, slot + 1)
        positions = input_pos if input_pos is not None else torch.arange(idx.shape[1], device=idx.device)
        attn = AttnSpan.of(idx.shape[1], input_pos, rows)
        cos, sin = self.rope(positions)  # [S, D]
        x = self.model.embed_tokens(idx)  # [B, S, C]
        for layer in self.model.layers:
            x = layer(x, cos, sin, input_pos, attn)
        if last_only:
            x = x[:, -1:]  # [B, 1, C]
        return self.lm_head(self.model.norm(x))  # [B, S, V]

    def prefill_slots(self, idx: Tensor, slots: Tensor, last: Tensor) -> Tensor:
        """Prefill several prompts into their cache slots in one forward.

        idx: [B, S] prompts, right-padded (causal attention keeps a prompt's tokens blind to its padding,
        and the padding's keys beyond a prompt are overwritten by its decode before they are ever read);
        slots: [B] cache rows; last: [B] index of each prompt's last token. Returns its logits [B, V].
        """
        bsz, seqlen = idx.shape
        input_pos = torch.arange(seqlen, device=idx.device)  # [S]
        attn = AttnSpan(seqlen, None, slots, local=True)
        cos, sin = self.rope(input_pos)  # [S, D]
        x = self.model.embed_tokens(idx)  # [B, S, C]
        for layer in self.model.layers:
            x = layer(x, cos, sin, input_pos, attn)
        x = x[torch.arange(bsz, device=idx.device), last]  # [B, C]
        return self.lm_head(self.model.norm(x))  # [B, V]

    def prefill_slots_at(self, idx: Tensor, slots: Tensor, offsets: Tensor, last: Tensor) -> Tensor:
        """Prefill the rest of several prompts whose first ``offsets[b]`` positions are already in their cache rows
        (a prefix cache's blocks), in one forward.

        idx: [B, S] the prompts' remaining tokens, right-padded; slots: [B] cache rows; offsets: [B] where each
        row's tokens start; last: [B] index in idx of each prompt's last token. Row b's token i sits at position
        offsets[b] + i and attends to its row's keys [0, offsets[b] + i]. Padding writes keys beyond the prompt
        (clamped to the cache's end), which the row's decode overwrites before reading them. Returns logits [B, V].
        """
        bsz, seqlen = idx.shape
        max_len = self.kv_caches()[0].max_seq_len
        positions = offsets[:, None] + torch.arange(seqlen, device=idx.device)[None, :]  # [B, S]
        end = min(int(offsets.max()) + seqlen, max_len)
        mask = torch.arange(end, device=idx.device)[None, None, :] <= positions[:, :, None]  # [B, S, T]
        attn = AttnSpan(end, mask[:, None], slots, write_positions=positions.clamp(max=max_len - 1))
        cos, sin = self.rope(positions.reshape(-1))  # [B*S, D]
        cos, sin = cos.view(bsz, 1, seqlen, -1), sin.view(bsz, 1, seqlen, -1)  # [B, 1, S, D]: per row
        x = self.model.embed_tokens(idx)  # [B, S, C]
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, attn)
        x = x[torch.arange(bsz, device=idx.device), last]  # [B, C]
        return self.lm_head(self.model.norm(x))  # [B, V]

    def kv_caches(self) -> list[KVCache]:
        """Every layer's cache (``setup_caches`` made them), in layer order."""
        caches = []
        for layer in self.model.layers:
            assert isinstance(layer, LlamaDecoderLayer) and layer.self_attn.kv_cache is not None
            caches.append(layer.self_attn.kv_cache)
        return caches

    def copy_slots(self, src: Tensor, dst: Tensor, length: int) -> None:
        """Copy cache rows ``src`` [N] to rows ``dst`` [N], positions [0, length), in every layer: a prompt
        prefilled once serves several sequences (the choices of one request)."""
        for layer in self.model.layers:
            assert isinstance(layer, LlamaDecoderLayer) and layer.self_attn.kv_cache is not None
            cache = layer.self_attn.kv_cache
            cache.k[dst, :, :length] = cache.k[src, :, :length]
            cache.v[dst, :, :length] = cache.v[src, :, :length]

    def decode_rows(self, idx: Tensor, positions: Tensor, end: int) -> Tensor:
        """One decode step of cache rows [0, B): row b takes token ``idx[b]`` at position ``positions[b]``.

        idx, positions: [B]; ``end`` > max(positions) bounds the keys read (one host-side int, so the step
        needs no device sync of its own). Each row attends to its own [0, positions[b]]. Returns logits [B, V].
        """
        bsz = idx.shape[0]
        attn = AttnSpan.per_row(positions, end, self.config.n_kv_heads, self.config.d_head)
        cos, sin = self.rope(positions)  # [B, D]
        cos, sin = cos.view(bsz, 1, 1, -1), sin.view(bsz, 1, 1, -1)  # [B, 1, 1, D]: one position per row
        x = self.model.embed_tokens(idx.view(bsz, 1))  # [B, 1, C]
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, attn)
        return self.lm_head(self.model.norm(x)).view(bsz, -1)  # [B, V]


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied lm_head is counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
