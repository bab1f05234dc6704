"""The GPU path in one prepared run: tiny-llama on KIND_GPU Triton instances, tokens/s at 1 and 32 streams.

    python -m bench.gpu_check [--seconds 8] [--rounds 2] [--max-tokens 128] [--out FILE]

Where ``torch.cuda.is_available()`` is false it says so and exits 0 (the CPU machines of this project).
Otherwise it checks, in order, and stops at the first failure with a non-zero exit:
1. the model code itself on ``cuda:0``: load tiny-llama in bfloat16, greedy ``generate()`` and the batching
   scheduler agree on a few prompts (same device, same dtype);
2. a model repository rendered with ``KIND_GPU`` instances (``render_llm_model``), served by the wheel's
   tritonserver: the model reports its device in Triton's log (``loading ... on cuda:0``);
3. ``bench.triton_llm``'s closed-loop measurement at 1 and 32 streams (greedy, fixed prompts).
It prints a table and writes JSON (and Triton's log beside it). Sized to finish in about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu_model import check_tiny
from bench.triton_llm import MODEL, ROOT, bench, print_table, render_llm_repository
from inferplane.executor.triton_process import TritonProcess, prepare_backend_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}): the GPU check needs a GPU machine; nothing to do")
        return 0
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    check_tiny(torch.device("cuda:0"))  # the model code itself first (bench.gpu_model)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        repo = render_llm_repository(Path(tmp) / "repo", kind="KIND_GPU", torch_threads=0, max_sequences=32)
        server = TritonProcess(repo, backend_dir=prepare_backend_dir(Path(tmp) / "cache"),
                               log_path=Path(tmp) / "triton.log")
        print("starting tritonserver with KIND_GPU instances ...", flush=True)
        server.start()
        try:
            server.wait_ready(timeout=300)
            if "on cuda:" not in server.log_tail(10**7):
                print(server.log_tail())
                raise SystemExit("the model did not load on a CUDA device (see Triton's log above)")
            rows = asyncio.run(bench(server.grpc_url, MODEL, [1, 32], rounds=args.rounds, seconds=args.seconds,
                                     warmup=1.5, max_tokens=args.max_tokens))
        finally:
            server.stop()
            shutil.copyfile(Path(tmp) / "triton.log", args.out.with_suffix(".triton.log"))
    print()
    print_table(rows)
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "kind": "KIND_GPU",
            "max_tokens": args.max_tokens, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    args.out.write_text(json.dumps({"meta": meta, "levels": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
