"""Constrained decoding: CPU cost per token of llguidance's mask (compute + apply) and of accept, on tiny-llama.

    python -m bench.constrained [--steps 300] [--threads N] [--out results.json]

What is measured. First the tiny model samples token traces at temperature 1 under each constraint (not timed):
a strict ``json_schema`` (integer, enum, boolean, string with maxLength) and ``json_object`` (traces cut at 200
tokens, where the model is mostly inside a long string). Then, with no model in the loop, the traces are replayed
through fresh matchers at batch sizes 1 and 32 (each row starts its next trace when one ends, so the batch stays
full, as under continuous batching), and per step it times with ``time.perf_counter`` (wall clock):

- ``mask``: ``apply_masks(logits [B, 4096] fp32 CPU, rows)``, everything the scheduler pays before sampling;
  of which ``fill`` is llguidance alone (its executor filling the int32 bitmask, on its thread pool) and
  ``apply`` the rest (bitmask -> boolean mask -> ``masked_fill`` of the rows);
- ``accept``: ``Matcher.accept(token)`` for every row.

Figures are µs per token: the median step's time / B (the mean, which the machine's other load inflates, is
in the JSON), and the p99 of a whole step's mask. Also printed:
``compile`` (ms, a cache miss) and ``matcher()`` (µs, a deep copy). The machine's other load counts too: run it
on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import llguidance
import torch
from tokenizers import Tokenizer

from inferplane.assets import TINY_LLAMA
from inferplane.modeling.constrained import GrammarCompiler, Matcher, apply_masks
from inferplane.modeling.llama import LlamaForCausalLM, load_model

EOS_IDS = frozenset({1, 6})
SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "enabled": {"type": "boolean"},
        "label": {"type": "string", "maxLength": 8},
    },
    "required": ["count", "colour", "enabled", "label"],
    "additionalProperties": False,
}
SPECS = {
    "json_schema": json.dumps({"json_schema": json.dumps(SCHEMA)}),
    "json_object": json.dumps({"json_object": True}),
}


def sample_traces(
    model: LlamaForCausalLM, prompt: list[int], matchers: list[Matcher], max_tokens: int,
) -> list[list[int]]:
    """Each row's accepted tokens (an eos included), sampled at temperature 1 with one seeded generator per row."""
    rows = len(matchers)
    generators = [torch.Generator().manual_seed(r) for r in range(rows)]
    traces: list[list[int]] = [[] for _ in range(rows)]
    live = set(range(rows))
    with torch.inference_mode():
        model.setup_caches(rows, len(prompt) + max_tokens)
        logits = model(torch.tensor(prompt).expand(rows, -1), torch.arange(len(prompt)), last_only=True)[:, -1]
        for step in range(max_tokens):
            apply_masks(logits, [(r, matchers[r]) for r in sorted(live)])
            probs = logits.softmax(-1)  # [B, V]
            tokens = torch.zeros(rows, dtype=torch.long)  # [B]
            for r in sorted(live):
                token = int(torch.multinomial(probs[r], 1, generator=generators[r]))
                matchers[r].accept(token)
                traces[r].append(token)
                tokens[r] = token
                if token in EOS_IDS or matchers[r].is_finished():
                    live.discard(r)
            if not live:
                break
            logits = model(tokens[:, None], torch.tensor([len(prompt) + step]))[:, -1]  # [B, V]
    return traces


def replay(compiler: GrammarCompiler, spec: str, traces: list[list[int]], batch: int, steps: int) -> dict[str, float]:
    """Replay ``traces`` through ``batch`` rows for ``steps`` steps, timing the mask and accept of each step."""
    grammar = compiler.compile(spec)
    # Row r plays traces r, r + batch, r + 2 * batch, ... (cyclically), a fresh matcher for each.
    next_trace = list(range(batch))
    rows = [(grammar.matcher(), traces[r % len(traces)], 0) for r in range(batch)]
    logits = torch.zeros(batch, compiler.vocab_size)  # [B, V]; values do not change the cost
    words = (compiler.vocab_size + 31) // 32
    mask_s, fill_s, accept_s = [], [], []
    for _ in range(steps):
        pairs = [(r, m) for r, (m, _, _) in enumerate(rows)]
        started = time.perf_counter()
        apply_masks(logits, pairs)
        mask_s.append(time.perf_counter() - started)

        # llguidance's fill alone, on copies in the same state (a fill does not advance a matcher)
        bitmask = torch.zeros((batch, words), dtype=torch.int32)
        started = time.perf_counter()
        compiler.executor.unsafe_compute_mask_ptr(
            [(m._matcher, r) for r, m in pairs], bitmask.data_ptr(), words * 4, batch,
        )
        fill_s.append(time.perf_counter() - started)

        started = time.perf_counter()
        for matcher, trace, pos in rows:
            matcher.accept(trace[pos])
        accept_s.append(time.perf_counter() - started)

        for r, (matcher, trace, pos) in enumerate(rows):
            if pos + 1 < len(trace):
                rows[r] = (matcher, trace, pos + 1)
            else:
                next_trace[r] += batch
                rows[r] = (grammar.matcher(), traces[next_trace[r] % len(traces)], 0)
    per_token = 1e6 / batch  # medians: robust to the other processes of a shared machine
    mask, fill = statistics.median(mask_s), statistics.median(fill_s)
    return {
        "mask_us_per_token": mask * per_token,
        "fill_us_per_token": fill * per_token,
        "apply_us_per_token": (mask - fill) * per_token,
        "accept_us_per_token": statistics.median(accept_s) * per_token,
        "mask_us_per_token_mean": statistics.fmean(mask_s) * per_token,
        "mask_step_p99_us": statistics.quantiles(mask_s, n=100)[98] * 1e6,
    }


def compile_costs(compiler: GrammarCompiler, spec: str) -> dict[str, float]:
    fresh = GrammarCompiler(TINY_LLAMA, compiler.vocab_size, EOS_IDS, cache_size=1, threads=1)
    started = time.perf_counter()
    grammar = fresh.compile(spec)
    compile_ms = (time.perf_counter() - started) * 1e3
    started = time.perf_counter()
    for _ in range(200):
        grammar.matcher()
    return {"compile_ms": compile_ms, "matcher_copy_us": (time.perf_counter() - started) / 200 * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per (constraint, batch size)")
    parser.add_argument("--traces", type=int, default=64, help="model-sampled traces per constraint")
    parser.add_argument("--threads", type=int, default=None, help="llguidance executor threads (default: its own)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(1)  # the timed part is single-row torch work; keep the model's threads out of the way
    model = load_model(TINY_LLAMA, dtype="float32", device=torch.device("cpu"))
    compiler = GrammarCompiler(TINY_LLAMA, model.config.vocab_size, EOS_IDS, threads=args.threads)
    prompt = Tokenizer.from_file(str(TINY_LLAMA / "tokenizer.json")).encode("Return a JSON object.").ids

    results = []
    print(f"{'constraint':12s} {'batch':>5s} {'mask µs/tok':>11s} {'(fill':>7s} {'apply)':>7s} "
          f"{'accept µs/tok':>13s} {'mask mean':>9s} {'step p99 µs':>11s}")
    for name, spec in SPECS.items():
        grammar = compiler.compile(spec)
        traces = sample_traces(model, prompt, [grammar.matcher() for _ in range(args.traces)], max_tokens=200)
        mean_len = statistics.fmean(len(t) for t in traces)
        costs = compile_costs(compiler, spec)
        for batch in (1, 32):
            row = replay(compiler, spec, traces, batch, args.steps)
            print(f"{name:12s} {batch:5d} {row['mask_us_per_token']:11.1f} {row['fill_us_per_token']:7.1f} "
                  f"{row['apply_us_per_token']:7.1f} {row['accept_us_per_token']:13.1f} "
                  f"{row['mask_us_per_token_mean']:9.1f} {row['mask_step_p99_us']:11.0f}")
            results.append({"constraint": name, "batch": batch, "steps": args.steps,
                            "mean_trace_tokens": mean_len, **costs, **row})
        print(f"{'':12s} compile {costs['compile_ms']:.2f} ms, matcher() {costs['matcher_copy_us']:.1f} µs, "
              f"traces of {mean_len:.0f} tokens on average")

    if args.out:
        args.out.write_text(json.dumps({
            "benchmark": "bench.constrained",
            "measured": "median-step wall µs per token of apply_masks (fill = llguidance bitmask, "
                        "apply = unpacking and masking) and of Matcher.accept, replaying tiny-llama traces; "
                        "logits [B, 4096] fp32 on the CPU",
            "llguidance": llguidance.__version__, "torch": torch.__version__, "cpus": os.cpu_count(),
            "executor_threads": args.threads, "results": results,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
