"""The torch Llama, its HF checkpoint loader, sampling and generation; and the shipped models/tiny-llama."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from inferplane.assets import TINY_LLAMA as ASSET_TINY_LLAMA
from inferplane.modeling.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    SamplingParams,
    generate,
    load_model,
    save_checkpoint,
)
from inferplane.modeling.llama.generate import decode_one_token, prefill
from inferplane.modeling.llama.model import apply_rotary, rope_inv_freq
from inferplane.modeling.llama.sampling import logits_to_probs, sample

TINY_LLAMA = ASSET_TINY_LLAMA
# fp32 on CPU: cached decode and a full forward take different matmul shapes, so they agree to rounding.
KV_ATOL = 1e-4


def small_config(**overrides: object) -> LlamaConfig:
    kw: dict[str, object] = dict(
        vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, eos_token_id=1,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)  # type: ignore[arg-type]


def seeded_model(cfg: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.ndim == 2 else 1.0)  # large enough that logits are far from uniform
    return model.eval()


def ids(n: int, seed: int = 1, vocab: int = 97) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def logits_of(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0]  # [S, V]


# ---------------------------------------------------------------- loader


@pytest.mark.parametrize("tied", [False, True])
def test_loader_round_trip_same_logits(tmp_path: Path, tied: bool) -> None:
    model = seeded_model(small_config(tie_word_embeddings=tied))
    save_checkpoint(model, tmp_path, dtype=torch.float32)
    loaded = load_model(tmp_path, dtype=torch.float32, device="cpu", progress=None)
    assert torch.equal(logits_of(model, ids(12)), logits_of(loaded, ids(12)))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied


def test_checkpoint_uses_hugging_face_names(tmp_path: Path) -> None:
    save_checkpoint(seeded_model(small_config()), tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{m}.weight" for i in range(2) for m in per_layer}
    assert names == expected
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["num_key_value_heads"] == 2 and cfg["torch_dtype"] == "bfloat16"


def test_loader_reads_sharded_checkpoint(tmp_path: Path) -> None:
    model = seeded_model(small_config())
    save_checkpoint(model, tmp_path / "single", dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(sharded / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (sharded / "config.json").write_text((tmp_path / "single" / "config.json").read_text())

    seen: list[tuple[int, int, str]] = []
    loaded = load_model(sharded, dtype=torch.float32, progress=lambda i, n, name, _t: seen.append((i, n, name)))
    assert [s[:2] for s in seen] == [(1, 2), (2, 2)]
    assert torch.equal(logits_of(model, ids(9)), logits_of(loaded, ids(9)))


def test_loader_casts_dtype_and_refuses_missing_tensors(tmp_path: Path) -> None:
    model = seeded_model(small_config())
    save_checkpoint(model, tmp_path, dtype=torch.float32)
    assert load_model(tmp_path, dtype="bfloat16", progress=None).model.norm.weight.dtype == torch.bfloat16
    state = {k: v for k, v in model.state_dict().items() if k != "model.norm.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(AssertionError, match=r"missing tensors \['model.norm.weight'\]"):
        load_model(tmp_path, progress=None)


# ---------------------------------------------------------------- model


def test_grouped_query_attention_shapes() -> None:
    cfg = small_config()  # 8 query heads share 2 kv heads, head_dim 8
    model = seeded_model(cfg)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (8 * 8, 64)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (2 * 8, 64)
    model.setup_caches(3, 10)
    assert attn.kv_cache is not None and attn.kv_cache.k.shape == (3, 2, 10, 8)  # [B, H_kv, S, D]
    with torch.inference_mode():
        out = model(torch.zeros(3, 4, dtype=torch.long), torch.arange(4))
    assert out.shape == (3, 4, 97)
    with pytest.raises(AssertionError, match="multiple of num_key_value_heads"):
        small_config(num_key_value_heads=3)


def test_kv_cache_decode_equals_full_forward() -> None:
    model, tokens = seeded_model(small_config()), ids(20)
    full = logits_of(model, tokens)  # [S, V]
    with torch.inference_mode():
        model.setup_caches(1, len(tokens))
        steps = [model(torch.tensor([tokens[:7]]), torch.arange(7))[0]]  # prefill from 0: causal, no mask
        steps.append(model(torch.tensor([tokens[7:12]]), torch.arange(7, 12))[0])  # a second chunk: masked
        steps += [decode_one_token(model, t, pos)[None] for pos, t in enumerate(tokens[12:], start=12)]
    cached = torch.cat(steps)  # [S, V]
    torch.testing.assert_close(cached, full, atol=KV_ATOL, rtol=0)
    with torch.inference_mode():
        model.setup_caches(1, 8)
        torch.testing.assert_close(prefill(model, torch.tensor(tokens[:8])), full[7], atol=KV_ATOL, rtol=0)


def test_slot_cache_batched_prefill_and_per_row_decode_equal_full_forwards() -> None:
    # The batching scheduler's path: several prompts prefilled into chosen slots in one right-padded
    # forward, then decoded together, each row at its own position; a free row (a hole) rides along.
    model = seeded_model(small_config())
    seqs = [ids(n, seed=n) for n in (5, 9, 3)]
    full = [logits_of(model, s) for s in seqs]  # [S, V] each
    slots = [3, 0, 1]  # slot 2 stays free
    with torch.inference_mode():
        model.setup_caches(4, 32)
        prompts = [s[:-2] for s in seqs]
        longest = max(len(p) for p in prompts)
        idx = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])  # [3, S] right-padded
        last = torch.tensor([len(p) - 1 for p in prompts])
        pre = model.prefill_slots(idx, torch.tensor(slots), last)  # [3, V]
        for i, s in enumerate(seqs):
            torch.testing.assert_close(pre[i], full[i][len(s) - 3], atol=KV_ATOL, rtol=0)
        for back in (2, 1):  # two decode steps over rows [0, 4)
            tok = torch.zeros(4, dtype=torch.long)
            pos = torch.zeros(4, dtype=torch.long)
            for slot, s in zip(slots, seqs, strict=True):
                tok[slot], pos[slot] = s[-back], len(s) - back
            out = model.decode_rows(tok, pos, int(pos.max()) + 1)  # [4, V]
            for slot, s, f in zip(slots, seqs, full, strict=True):
                torch.testing.assert_close(out[slot], f[len(s) - back], atol=KV_ATOL, rtol=0)


def test_forward_into_one_slot_leaves_the_others_alone() -> None:
    model = seeded_model(small_config())
    a, b = ids(6, seed=1), ids(6, seed=2)
    with torch.inference_mode():
        model.setup_caches(2, 16)
        model(torch.tensor([a]), torch.arange(6), slot=1)
        cache = model.model.layers[0].self_attn.kv_cache
        assert cache is not None
        before = cache.k[1].clone()
        logits = model(torch.tensor([b]), torch.arange(6), slot=0, last_only=True)
        assert torch.equal(cache.k[1], before)
        assert logits.shape == (1, 1, 97)
        torch.testing.assert_close(logits[0, 0], logits_of(model, b)[-1], atol=KV_ATOL, rtol=0)


def test_llama3_rope_scaling_slows_only_long_wavelengths() -> None:
    base = rope_inv_freq(small_config(head_dim=64, hidden_size=512))
    scaled = rope_inv_freq(small_config(head_dim=64, hidden_size=512, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }))
    assert torch.equal(scaled[:4], base[:4])  # short wavelengths kept
    torch.testing.assert_close(scaled[-4:], base[-4:] / 8.0)  # long ones divided by the factor
    assert torch.all(scaled <= base)


def test_rotary_keeps_norms_and_position_zero() -> None:
    model = seeded_model(small_config())
    cos, sin = model.rope(torch.arange(5))
    assert torch.allclose(cos[0], torch.ones(8)) and torch.allclose(sin[0], torch.zeros(8))
    x = torch.randn(1, 1, 5, 8)
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


# ---------------------------------------------------------------- sampling and generation


def test_greedy_is_deterministic() -> None:
    model = seeded_model(small_config())
    runs = [[s.token_id for s in generate(model, ids(5), max_tokens=20)] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 20


def test_seeded_sampling_is_reproducible() -> None:
    model = seeded_model(small_config())

    def run(seed: int) -> list[int]:
        p = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=seed)
        return [s.token_id for s in generate(model, ids(5), max_tokens=30, sampling=p)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(97, generator=torch.Generator().manual_seed(3))
    best = int(logits.argmax())
    for p in (SamplingParams(temperature=1.0, top_k=1, seed=0), SamplingParams(temperature=1.0, top_p=1e-6, seed=0)):
        probs = logits_to_probs(logits, p)
        assert int(probs.argmax()) == best and float(probs[best]) == pytest.approx(1.0)
    token, logprob = sample(logits, SamplingParams(), None)
    assert token == best and logprob == pytest.approx(float(torch.log_softmax(logits, -1)[best]))


def test_stop_ids_end_generation_and_are_counted() -> None:
    model = seeded_model(small_config())
    free = [s.token_id for s in generate(model, ids(5), max_tokens=20)]
    stop = free[3]
    first = free.index(stop)
    gen = generate(model, ids(5), max_tokens=20, stop_ids=[stop])
    out = [s.token_id for s in gen]
    assert out == free[:first]  # the stop token itself is not yielded ...
    assert gen.finish_reason == "stop" and gen.completion_tokens == first + 1  # ... but it is counted


def test_max_tokens_and_context_length_end_with_length() -> None:
    model = seeded_model(small_config())
    gen = generate(model, ids(5), max_tokens=7)
    assert len(list(gen)) == 7 and gen.finish_reason == "length" and gen.completion_tokens == 7
    gen = generate(model, ids(5), max_tokens=50, max_context=8)  # prompt 5 + 3 = context 8
    assert len(list(gen)) == 3 and gen.finish_reason == "length" and gen.prompt_tokens == 5
    with pytest.raises(AssertionError, match="leaves no room"):
        generate(model, ids(8), max_tokens=1, max_context=8)


def test_cancel_callback_stops_generation() -> None:
    model = seeded_model(small_config())
    produced: list[int] = []
    gen = generate(model, ids(5), max_tokens=50, is_cancelled=lambda: len(produced) >= 3)
    for step in gen:
        produced.append(step.token_id)
    assert len(produced) == 3 and gen.finish_reason == "cancelled" and gen.completion_tokens == 3


# ---------------------------------------------------------------- the shipped checkpoint


@pytest.fixture(scope="module")
def tiny_llama() -> tuple[LlamaForCausalLM, Tokenizer]:
    if not (TINY_LLAMA / "model.safetensors").exists():
        pytest.fail(f"{TINY_LLAMA} is missing: run scripts/train_tiny_llama.py")
    return load_model(TINY_LLAMA, progress=None), Tokenizer.from_file(str(TINY_LLAMA / "tokenizer.json"))


def test_shipped_checkpoint_files() -> None:
    cfg = json.loads((TINY_LLAMA / "config.json").read_text())
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    gen_cfg = json.loads((TINY_LLAMA / "generation_config.json").read_text())
    tok_cfg = json.loads((TINY_LLAMA / "tokenizer_config.json").read_text())
    tok = Tokenizer.from_file(str(TINY_LLAMA / "tokenizer.json"))
    assert set(gen_cfg["eos_token_id"]) == {tok.token_to_id("</s>"), tok.token_to_id("<|end|>")}
    assert "add_generation_prompt" in tok_cfg["chat_template"] and tok_cfg["bos_token"] == "<s>"
    assert sum(f.stat().st_size for f in TINY_LLAMA.iterdir()) < 15e6


def test_shipped_model_writes_docstring_english(tiny_llama: tuple[LlamaForCausalLM, Tokenizer]) -> None:
    model, tok = tiny_llama
    prompt = tok.encode("Create a new").ids
    gen = generate(model, prompt, max_tokens=40, stop_ids=[tok.token_to_id("</s>"), tok.token_to_id("<|end|>")])
    new = [s.token_id for s in gen]
    text = tok.decode(new)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(new) >= 8, f"only {len(new)} tokens: {text!r}"
    assert len(set(new)) >= len(new) // 4, f"degenerate repetition: {text!r}"
    assert len(words) >= 5 and len(set(words)) >= 4, text
    common = {"the", "a", "of", "to", "is", "and", "in", "or", "if", "be", "for", "an", "it", "that", "are"}
    assert common & {w.lower() for w in words}, f"no common English word in {text!r}"
