"""The model runtime on a GPU, in process (no Triton): correctness, the real loader on full-size checkpoints, and
the continuous-batching scheduler's decode throughput.

    python -m bench.gpu_model [--sizes tiny,1b,8b] [--batches 1,8,32,64,128] [--new-tokens 128] [--out FILE]

Where ``torch.cuda.is_available()`` is false it says so and exits 0 (the CPU machines of this project).
Otherwise, in order, stopping at the first failure with a non-zero exit:
1. the shipped tiny-llama on ``cuda:0`` in bfloat16: greedy decoding of a few prompts alone (``generate``) and
   batched (``BatchScheduler``) agree;
2. for each full size asked (``1b``: Llama-3.2-1B's shape, ``8b``: Llama-3-8B's), a checkpoint in the Hugging
   Face layout (``config.json``, sharded ``model-0000k-of-0000n.safetensors`` and their index), seeded random
   weights, written to disk and loaded back by the same ``load_model`` the Triton model uses, onto the GPU;
3. decode throughput of ``BatchScheduler`` at each batch size: every sequence has a 128-token prompt and
   generates ``--new-tokens`` tokens (no stop ids, as load tools' ``ignore_eos``); tokens/s over the whole run
   (prefill included) and the median decode step.
It needs only torch, safetensors and tokenizers (so it runs where the mesh's other packages are not installed)
and writes a JSON file beside the table it prints.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from inferplane.modeling.llama import generate, load_model
from inferplane.modeling.llama.batching import BatchScheduler, SequenceRequest, TokenEvent
from inferplane.modeling.llama.loader import hf_config_dict
from inferplane.modeling.llama.model import LlamaConfig, LlamaForCausalLM

TINY_LLAMA = Path(__file__).resolve().parents[1] / "services" / "inferplane" / "assets" / "models" / "tiny-llama"
EOS = frozenset({1, 6})
PROMPTS = ["Return the absolute path of", "Open the file and", "def join(a, *p):", "The socket module"]
# Hugging Face config fields of the public models whose shapes are used (weights are seeded random).
SHAPES: dict[str, dict[str, Any]] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False},
    # a dry run of this script on the CPU (--device cpu --sizes tiny,mini)
    "mini": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024, "tie_word_embeddings": False},
}
SHARD_BYTES = 4 << 30


def check_tiny(device: torch.device) -> dict[str, Any]:
    from tokenizers import Tokenizer

    model = load_model(TINY_LLAMA, dtype="bfloat16", device=device, progress=None)
    tok = Tokenizer.from_file(str(TINY_LLAMA / "tokenizer.json"))
    prompts = [tok.encode(p).ids for p in PROMPTS]
    scheduler = BatchScheduler(model, max_sequences=8, max_context=256)
    for i, p in enumerate(prompts):
        scheduler.add(SequenceRequest(i, p, 32, stop_ids=EOS))
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    while scheduler.has_work():
        for ev in scheduler.step():
            if isinstance(ev, TokenEvent):
                got[int(ev.id)].append(ev.token_id)  # type: ignore[call-overload]
    cache = model.model.layers[0].self_attn.kv_cache
    assert cache is not None and cache.k.device == model.device, "the KV cache is not on the model's device"
    same = sum([s.token_id for s in generate(model, p, max_tokens=32, stop_ids=EOS, max_context=256)] == got[i]
               for i, p in enumerate(prompts))
    texts = [tok.decode(got[i]) for i in range(len(prompts))]
    print(f"tiny-llama on {device} (bfloat16): {same}/{len(prompts)} prompts identical alone and batched; "
          f"first: {PROMPTS[0]!r} -> {texts[0][:60]!r}", flush=True)
    # bf16 rounding can flip a near-tie between batch shapes: one difference is reported, more fail
    assert same >= len(prompts) - 1, "batched greedy decoding differs from single-sequence decoding on the GPU"
    return {"identical": same, "prompts": len(prompts)}


def write_checkpoint(shape: str, root: Path, device: torch.device) -> tuple[Path, int, float]:
    """A Llama checkpoint of ``shape`` in the HF layout with sharded safetensors; returns (dir, params, seconds)."""
    started = time.monotonic()
    cfg_dict = {**hf_config_dict(LlamaConfig(**SHAPES[shape]), torch.bfloat16),
                "max_position_embeddings": 2048, "rope_theta": 500000.0, "bos_token_id": 128000,
                "eos_token_id": 128001}
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig.from_hf_dict(cfg_dict)).to(torch.bfloat16)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg_dict["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    params = sum(v.numel() for v in state.values())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.cpu()
        size += nbytes
    out = root / f"llama-{shape}"
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    del model, state, shards
    empty_cache()
    return out, params, time.monotonic() - started


def throughput(model: LlamaForCausalLM, batch: int, new_tokens: int, prompt_len: int = 128) -> dict[str, Any]:
    scheduler = BatchScheduler(model, max_sequences=batch, max_context=prompt_len + new_tokens,
                               prefill_token_budget=max(2048, prompt_len * min(batch, 32)))
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(2, vocab, (prompt_len,), generator=gen).tolist()
        scheduler.add(SequenceRequest(i, prompt, new_tokens))
    tokens, steps = 0, []
    started = time.perf_counter()
    while scheduler.has_work():
        t0 = time.perf_counter()
        events = scheduler.step()  # reads the sampled ids back: the step has run on the GPU
        steps.append((time.perf_counter() - t0, sum(isinstance(e, TokenEvent) for e in events)))
        tokens += steps[-1][1]
    wall = time.perf_counter() - started
    full = [dt for dt, n in steps if n == batch]
    step_ms = statistics.median(full) * 1000 if full else float("nan")
    return {"batch": batch, "tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall),
            "decode_step_ms": round(step_ms, 2), "decode_tokens_per_s": round(batch / step_ms * 1000) if full else None}


def run_size(name: str, model: LlamaForCausalLM, batches: list[int], new_tokens: int) -> list[dict[str, Any]]:
    throughput(model, 1, 8)  # warm-up: kernels chosen, allocator primed
    rows = []
    for b in batches:
        row = {"model": name, **throughput(model, b, new_tokens)}
        print(f"  {name:5s} batch {b:4d}: {row['tokens_per_s']:7d} tokens/s overall, decode step "
              f"{row['decode_step_ms']:7.2f} ms = {row['decode_tokens_per_s']} tokens/s", flush=True)
        rows.append(row)
        empty_cache()
    return rows


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,1b,8b")
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_model.json"))
    parser.add_argument("--device", default="cuda:0", help="cpu: a dry run of the script (with --sizes tiny,mini)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}): the GPU check needs a GPU machine; nothing to do")
        return 0
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none (cpu dry run)"
    meta = {"gpu": gpu, "torch": torch.__version__, "dtype": "bfloat16",
            "new_tokens": args.new_tokens, "prompt_tokens": 128, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(f"GPU: {meta['gpu']}, torch {meta['torch']}", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    result: dict[str, Any] = {"meta": meta, "rows": [], "loads": []}
    sizes = args.sizes.split(",")
    if "tiny" in sizes:
        result["tiny_check"] = check_tiny(device)
        tiny = load_model(TINY_LLAMA, dtype="bfloat16", device=device, progress=None)
        result["rows"] += run_size("tiny", tiny, batches, min(args.new_tokens, 256))
        del tiny
    with tempfile.TemporaryDirectory(prefix="gpu-model-") as tmp:
        for size in (s for s in sizes if s in SHAPES):
            ckpt, params, wrote_s = write_checkpoint(size, Path(tmp), device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.monotonic()
            model = load_model(ckpt, dtype="bfloat16", device=device,
                               progress=lambda i, n, name, s: print(f"  loaded shard {i}/{n} {name} ({s:.1f}s)",
                                                                    flush=True))
            load_s = time.monotonic() - t0
            gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            print(f"{size}: {params / 1e9:.2f} B parameters, checkpoint written in {wrote_s:.1f}s, loaded by "
                  f"load_model in {load_s:.1f}s ({gib:.1f} GiB on the GPU)", flush=True)
            result["loads"].append({"model": size, "params": params, "write_s": round(wrote_s, 1),
                                    "load_s": round(load_s, 1), "gpu_gib": round(gib, 1)})
            result["rows"] += run_size(size, model, batches, args.new_tokens)
            del model
            empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
