"""Time to first token of a 300-token prompt whose first ~290 tokens are a shared system prompt: prefix cache cold vs
warm, in the LLM runtime itself (``BatchScheduler`` on the shipped tiny-llama, or a seeded random Llama of a larger
shape with ``--shape``), no mesh around it. Prints figures; asserts nothing about speed.

    .venv/bin/python -m bench.prefix_cache                 # tiny-llama, CPU, a few seconds
    .venv/bin/python -m bench.prefix_cache --device cuda --shape 1b --dtype bfloat16

Cold: each prompt has a system prompt never seen before (a miss: all 300 tokens computed). Warm: the same system
prompt with a different question each time (its 18 full blocks reused, the rest computed). TTFT here is from
``add`` to the step that produced the sequence's first token (one prefill; nothing else runs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from inferplane.assets import TINY_LLAMA
from inferplane.modeling.llama import LlamaConfig, LlamaForCausalLM, load_model
from inferplane.modeling.llama.batching import BatchScheduler, SequenceRequest, TokenEvent

PROMPT, SYSTEM = 300, 290  # tokens: the prompt, and its shared system part
SHAPES = {  # seeded random Llamas (no checkpoint needed): hidden, layers, heads, kv heads, intermediate
    "1b": (2048, 16, 32, 8, 8192),
    "3b": (3072, 28, 24, 8, 8192),
}


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    if args.shape == "tiny":
        return load_model(TINY_LLAMA, dtype=args.dtype, device=args.device, progress=None)
    hidden, layers, heads, kv, inter = SHAPES[args.shape]
    cfg = LlamaConfig(vocab_size=32_000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    return model.eval()


def ttft(scheduler: BatchScheduler, prompt: list[int], rid: int, device: str) -> tuple[float, int]:
    scheduler.add(SequenceRequest(rid, prompt, 1))
    start = time.perf_counter()
    first = None
    cached = 0
    while scheduler.has_work():
        events = scheduler.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if first is None and any(isinstance(e, TokenEvent) for e in events):
            first = time.perf_counter() - start
        cached = max([cached] + [getattr(e, "cached_tokens", 0) for e in events])
    assert first is not None
    return first, cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", *SHAPES], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: as the catalog runs on 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)

    def tokens(n: int) -> list[int]:
        return torch.randint(2, vocab, (n,), generator=gen).tolist()

    scheduler = BatchScheduler(model, max_sequences=4, max_context=512, prefix_cache_blocks=256)
    system = tokens(SYSTEM)
    ttft(scheduler, tokens(PROMPT), -1, args.device)  # warm up the kernels
    ttft(scheduler, system + tokens(PROMPT - SYSTEM), -2, args.device)  # the shared system prompt, now cached
    cold, warm, cached = [], [], 0
    for i in range(args.repeats):
        cold.append(ttft(scheduler, tokens(PROMPT), 2 * i, args.device)[0])
        took, cached = ttft(scheduler, system + tokens(PROMPT - SYSTEM), 2 * i + 1, args.device)
        warm.append(took)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"model {args.shape} on {args.device} ({args.dtype}); {PROMPT}-token prompt, {SYSTEM} shared; "
          f"{args.repeats} of each, medians")
    print(f"TTFT cold (no reuse)         {c * 1e3:8.2f} ms")
    print(f"TTFT warm ({cached} cached)     {w * 1e3:8.2f} ms   {c / w:.1f}x faster")


if __name__ == "__main__":
    main()
