"""Tokens/s of the whole stack at 32 concurrent streams: all free, against half of them constrained (json_schema).

    python -m bench.constrained_mix [--state-dir DIR] [--streams 32] [--max-tokens 128] [--seconds 20] [--out F]

Each of ``--streams`` workers loops streamed chat completions through the ``openai`` SDK for ``--seconds`` (after
a warm-up), every request ``max_tokens`` long (``ignore_eos``; the constrained ones under a schema whose one
string property takes the whole budget, so both kinds produce the same number of tokens). Two phases on the same
stack, in turn ``--rounds`` times: "free" (every stream free) and "half" (every other stream constrained, so
constrained and free sequences share the model's batches). Printed: completion tokens/s of each phase (from the
usage the server reports), the ratio half / free, and the constrained streams' share of the tokens.

Without ``--state-dir`` a stack is started on free ports (``inferplane up``'s defaults) and stopped at the end.
The machine's other load counts: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench._stack import local_stack, progress
from inferplane.cli.launcher import read_env

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Describe what os.path.join does."}]
LONG_TEXT: dict[str, Any] = {"type": "json_schema", "json_schema": {"name": "note", "strict": True, "schema": {
    "type": "object", "properties": {"text": {"type": "string", "maxLength": 4000}}, "required": ["text"],
    "additionalProperties": False}}}


async def phase(base_url: str, key: str, streams: int, max_tokens: int, seconds: float,
                constrained_every: int) -> dict[str, float]:
    """Run ``streams`` looping workers for ``seconds``; every ``constrained_every``-th one constrained (0: none)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)
    tokens = {"free": 0, "constrained": 0}
    end = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        kind = "constrained" if constrained_every and i % constrained_every == 0 else "free"
        extra: dict[str, Any] = {"response_format": LONG_TEXT} if kind == "constrained" else {}
        while time.perf_counter() < end:
            stream = await client.chat.completions.create(  # type: ignore[call-overload]
                model=MODEL, messages=MESSAGES, max_tokens=max_tokens, temperature=1, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **extra)
            async for chunk in stream:
                if chunk.usage is not None:
                    tokens[kind] += chunk.usage.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(i) for i in range(streams)])
    wall = time.perf_counter() - t0
    await client.close()
    total = tokens["free"] + tokens["constrained"]
    return {"tokens_per_s": total / wall, "tokens": total, "constrained_share": tokens["constrained"] / max(total, 1),
            "wall_s": wall}


async def run(state: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = read_env(state / "local.env")
    base, key = env["INFERPLANE_BASE_URL"], env["INFERPLANE_API_KEY"]
    progress("warm-up ...")
    await phase(base, key, args.streams, args.max_tokens, 3, 2)
    results: dict[str, list[dict[str, float]]] = {"free": [], "half": []}
    for r in range(args.rounds):
        for name, every in (("free", 0), ("half", 2)):
            progress(f"round {r + 1}/{args.rounds}: {name} ({args.streams} streams, {args.seconds:g}s) ...")
            results[name].append(await phase(base, key, args.streams, args.max_tokens, args.seconds, every))
            progress(f"  {results[name][-1]['tokens_per_s']:.0f} tokens/s")
    free = statistics.median(x["tokens_per_s"] for x in results["free"])
    half = statistics.median(x["tokens_per_s"] for x in results["half"])
    return {"streams": args.streams, "max_tokens": args.max_tokens, "free_tokens_per_s": free,
            "half_constrained_tokens_per_s": half, "ratio": half / free, "rounds": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with local_stack(args.state_dir) as state:
        out = asyncio.run(run(state, args))
    print(f"{'phase':<28} {'tokens/s':>10}")
    print(f"{'all free':<28} {out['free_tokens_per_s']:>10.0f}")
    print(f"{'half constrained':<28} {out['half_constrained_tokens_per_s']:>10.0f}")
    print(f"ratio half / free: {out['ratio']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
