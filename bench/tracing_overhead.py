"""Cost of tracing: the same short requests through the whole stack with tracing on, then off, in one run.

    python -m bench.tracing_overhead [--requests 60] [--concurrency 4]

Starts a local stack (free ports) with the file exporter (every span of every service written, Triton's
included), measures p50 latency of sequential 1-token completions and the throughput of concurrent ones,
stops it, and repeats with tracing off (exporter "none"). Prints both and the differences; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench._stack import local_stack
from inferplane.cli.launcher import read_env

BODY = {"model": "tiny-llama", "prompt": "Return the", "max_tokens": 1, "temperature": 0}


def measure(exporter: str, n: int, concurrency: int) -> dict[str, float]:
    with local_stack(None, trace_exporter=exporter) as state:
        env = read_env(state / "local.env")
        headers = {"Authorization": f"Bearer {env['INFERPLANE_API_KEY']}"}
        with httpx.Client(base_url=env["INFERPLANE_BASE_URL"], headers=headers, timeout=60) as http:
            for _ in range(5):  # warm-up
                http.post("/completions", json=BODY).raise_for_status()
            lat = []
            for _ in range(n):
                t0 = time.perf_counter()
                http.post("/completions", json=BODY).raise_for_status()
                lat.append(time.perf_counter() - t0)

            def one(_: int) -> None:
                http.post("/completions", json=BODY).raise_for_status()

            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(one, range(n)))
            rps = n / (time.perf_counter() - t0)
        spans = sum(1 for _ in (state / "traces.jsonl").open()) if (state / "traces.jsonl").exists() else 0
        return {"p50_ms": statistics.median(lat) * 1000, "p90_ms": statistics.quantiles(lat, n=10)[-1] * 1000,
                "requests_per_s": rps, "spans_written": spans}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results/tracing_overhead.json"))
    args = parser.parse_args()
    on = measure("file", args.requests, args.concurrency)
    off = measure("none", args.requests, args.concurrency)
    print(f"\n1-token completions through gateway→router→tokenizer/executor/Triton/metering, n={args.requests}")
    print(f"{'tracing':<9}{'p50 ms':>9}{'p90 ms':>9}{'req/s':>9}{'spans':>8}")
    for name, r in (("on", on), ("off", off)):
        print(f"{name:<9}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}{r['requests_per_s']:>9.1f}{r['spans_written']:>8}")
    print(f"p50 added by tracing: {on['p50_ms'] - off['p50_ms']:+.2f} ms; "
          f"throughput change: {(on['requests_per_s'] / off['requests_per_s'] - 1) * 100:+.1f} %")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"on": on, "off": off, "args": vars(args) | {"out": str(args.out)}}, indent=2))


if __name__ == "__main__":
    main()
