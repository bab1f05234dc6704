"""Incremental detokenization: µs of CPU per streamed token of ``IncrementalDecoder`` (the router's decoder).

    python -m bench.detok [--model tiny-llama] [--tokens 20000] [--chunk 1]

Decodes the tokens of a text of the standard library's docstrings (what the shipped model was trained on) and
of a multilingual, emoji-rich text (characters split over byte-fallback tokens), pushed ``--chunk`` ids at a
time, and prints µs per token for each; a full ``decode`` of the same ids per token is printed beside them as
the scale (what one Rust call costs).
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import time

from inferplane.assets import CATALOG
from inferplane.tokenization import TokenizerRegistry
from inferplane.tokenization.bundle import TokenizerBundle
from inferplane.tokenization.detok import IncrementalDecoder

MIXED = "Grüße aus München! 日本語のテキスト、中文也有。한국어 🙂🚀👍🏽 and 👨‍👩‍👧 ok.\n"


def stdlib_text(chars: int) -> str:
    parts: list[str] = []
    for module in (os, random, inspect, argparse, time):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(doc)
    text = "\n".join(parts)
    return (text * (chars // max(1, len(text)) + 1))[:chars]


def per_token_us(bundle: TokenizerBundle, ids: list[int], chunk: int) -> float:
    chunks = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    best = float("inf")
    for _ in range(3):
        decoder = IncrementalDecoder(bundle, skip_special_tokens=True)
        started = time.process_time()
        for c in chunks:
            decoder.push(c)
        decoder.flush()
        best = min(best, time.process_time() - started)
    return best / len(ids) * 1e6


def full_decode_us(bundle: TokenizerBundle, ids: list[int]) -> float:
    window = ids[:8]
    started = time.process_time()
    for _ in range(len(ids)):
        bundle.tokenizer.decode(window, skip_special_tokens=True)
    return (time.process_time() - started) / len(ids) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--chunk", type=int, default=1, help="ids per push (stream_interval, coalesced messages)")
    args = parser.parse_args()
    bundle = TokenizerRegistry.from_catalog_file(CATALOG).get(args.model)
    for name, text in (("stdlib docstrings", stdlib_text(args.tokens * 4)), ("multilingual+emoji", MIXED * 400)):
        ids = bundle.encode(text)[: args.tokens]
        print(f"{name:20s} {len(ids):6d} tokens, {args.chunk} per push: "
              f"{per_token_us(bundle, ids, args.chunk):6.2f} µs/token "
              f"(one 8-id decode call: {full_decode_us(bundle, ids):.2f} µs)")


if __name__ == "__main__":
    main()
