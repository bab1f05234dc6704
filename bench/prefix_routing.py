"""Cache-aware routing against power of two choices and random, in one run, on ``inferplane up --executors 2``.

    python -m bench.prefix_routing [--prompts 32] [--users 8] [--system-tokens 448] [--rate 12[,16,...]]
                                   [--max-tokens 8] [--cache-share 0.73] [--policies cache_aware,p2c,random]
                                   [--plot docs/prefix-routing.png]

The stack is started through the launcher (``LocalStack``: Envoy, the router with its REST edge, metering, two
executors each with its own Triton serving tiny-llama), with tiny-llama's ``prefix_cache_blocks`` set so that the
system prompts' blocks are ``--cache-share`` of the two replicas' caches together: more than one replica holds,
less than both do (llm-d's benchmark: 73 %). The workload: ``--prompts`` system prompts of ``--system-tokens``
tokens, each followed by ``--users`` users' own questions (~30 tokens); sent in ``--users`` rounds, each round every
system prompt once in a shuffled order, through Envoy over gRPC: an open loop of Poisson arrivals at ``--rate`` a
second (the same offered load for every policy, as llm-d's and Dynamo's benchmarks drive a request rate; a TTFT counts
from the arrival, so queueing shows), or with ``--rate 0`` by ``--workers`` closed-loop streams. Several rates
(``--rate 6,10,16``) run the whole comparison at each, one after another on the same stack: how the gain depends on
the load.

One phase per policy (``cache_aware``, ``p2c``, ``random``: the router's ``routing_policy``, the router restarted
between phases), each with system prompts of its own, so every phase starts with cold caches; with ``--twice`` (the
default) each policy runs twice, in the order A B C C B A, so the shared machine's drift weighs on each alike, and
its two phases are counted together. Prints TTFT p50/p90,
completion tokens/s and the share of prompt tokens the model reused (``usage.cached_tokens``), and the ratios
against ``p2c``, the median TTFT of the requests that reused part of their prompt and of the others, and how busy
the machine's CPUs were (/proc/stat: on a shared 2-core machine the stack competes with itself); writes a plot.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench._stack import catalog_with, progress
from inferplane.assets import CATALOG
from inferplane.cli.launcher import LocalStack, StackConfig, read_env
from inferplane.v1 import router_pb2, router_pb2_grpc

MODEL = "tiny-llama"
POLICIES = ("cache_aware", "p2c", "random")
BLOCK = 16  # the catalog's prefix_block_size for tiny-llama (the default)


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


@dataclass
class Phase:
    policy: str
    rate: float = 0.0
    ttft: list[float] = field(default_factory=list)
    hit_ttft: list[float] = field(default_factory=list)  # requests that reused some of their prompt
    miss_ttft: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    failed: int = 0
    seconds: float = 0.0
    cpu_busy: int = 0  # jiffies the machine's CPUs were busy during the phase
    cpu_total: int = 0

    def p(self, q: int) -> float:
        if len(self.ttft) < 2:
            return self.ttft[0] if self.ttft else math.nan
        return statistics.quantiles(self.ttft, n=100)[q - 1]

    def merge(self, other: Phase) -> None:
        self.ttft += other.ttft
        self.hit_ttft += other.hit_ttft
        self.miss_ttft += other.miss_ttft
        self.completion_tokens += other.completion_tokens
        self.prompt_tokens += other.prompt_tokens
        self.cached_tokens += other.cached_tokens
        self.failed += other.failed
        self.seconds += other.seconds
        self.cpu_busy += other.cpu_busy
        self.cpu_total += other.cpu_total

    @property
    def cpu_share(self) -> float:
        return self.cpu_busy / self.cpu_total if self.cpu_total else math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else math.nan

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else math.nan


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms" if values else "-"


def vocabulary() -> list[str]:
    """Words of the standard library's docstrings (the text tiny-llama was trained on)."""
    import collections
    import json
    import os
    import pathlib
    import string
    words: set[str] = set()
    for module in (os, json, string, pathlib, collections, statistics, asyncio, random, tempfile):
        for name in dir(module):
            doc = getattr(getattr(module, name, None), "__doc__", None)
            if not isinstance(doc, str):
                continue
            words.update(w for w in doc.split() if w.isalpha() and len(w) > 2)
    return sorted(words)


def make_text(rng: random.Random, words: list[str], tokens: int, count) -> str:  # type: ignore[no-untyped-def]
    """Random words until the text is ``tokens`` tokens long (``count``: the model's tokenizer)."""
    out: list[str] = []
    while count(" ".join(out)) < tokens:
        out.append(rng.choice(words))
    return " ".join(out)


def workload(phase: int, args: argparse.Namespace, words: list[str], count) -> list[str]:  # type: ignore[no-untyped-def]
    rng = random.Random(1000 + phase)
    systems = [make_text(rng, words, args.system_tokens, count) for _ in range(args.prompts)]
    prompts = []
    for user in range(args.users):
        order = list(range(args.prompts))
        rng.shuffle(order)
        for i in order:
            question = make_text(rng, words, 24, count)
            prompts.append(f"{systems[i]}\n\nUser {user}: {question}\nAnswer:")
    return prompts


async def run_phase(addr: str, key: str, prompts: list[str], phase: Phase, workers: int, max_tokens: int,
                    rate: float = 0.0) -> None:
    """Send ``prompts`` in order: by ``workers`` closed-loop streams, or (``rate`` > 0) as an open loop, Poisson
    arrivals at ``rate`` a second whatever the answers' speed (a TTFT counts from the request's arrival)."""
    metadata = [("authorization", f"Bearer {key}")]
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)

        async def one(prompt: str, arrived: float) -> None:
            first = None
            cached = 0
            try:
                async for msg in stub.Generate(router_pb2.GenerateRequest(
                        model=MODEL, prompt=prompt, max_tokens=max_tokens, include_usage=True),
                        metadata=metadata, timeout=120):
                    if first is None and msg.token_count:
                        first = time.perf_counter() - arrived
                    if msg.HasField("usage"):
                        phase.prompt_tokens += msg.usage.prompt_tokens
                        phase.completion_tokens += msg.usage.completion_tokens
                        phase.cached_tokens += msg.usage.cached_tokens
                        cached = msg.usage.cached_tokens
            except grpc.aio.AioRpcError as exc:
                phase.failed += 1
                progress(f"  {phase.policy}: request failed: {exc.code().name} {exc.details()}")
                return
            if first is not None:
                phase.ttft.append(first)
                (phase.hit_ttft if cached else phase.miss_ttft).append(first)

        started = time.perf_counter()
        busy0, total0 = cpu_times()
        if rate > 0:
            rng = random.Random(len(prompts))
            tasks, due = [], started
            for prompt in prompts:
                due += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                tasks.append(asyncio.create_task(one(prompt, due)))
            await asyncio.gather(*tasks)
        else:
            queue = list(reversed(prompts))

            async def worker() -> None:
                while queue:
                    await one(queue.pop(), time.perf_counter())

            await asyncio.gather(*(worker() for _ in range(workers)))
        phase.seconds = time.perf_counter() - started
        busy1, total1 = cpu_times()
        phase.cpu_busy, phase.cpu_total = busy1 - busy0, total1 - total0


def load(rate: float, workers: int) -> str:
    return f"open loop at {rate:g} requests/s" if rate > 0 else f"{workers} closed-loop streams"


def restart_router(stack: LocalStack, policy: str) -> None:
    stack.settings["router"]["routing_policy"] = policy
    stack.write_settings()
    stack.supervisor.stop("router")
    stack.spawn("router")


def plot(phases: list[Phase], path: Path, note: str) -> None:
    """TTFT p50/p90 per policy, and the share of prompt tokens reused (with tokens/s over it); with several rates,
    TTFT p50 against the rate per policy, and cache_aware's gain over p2c."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rates = sorted({p.rate for p in phases})
    if len(rates) > 1:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
        for policy in dict.fromkeys(p.policy for p in phases):
            mine = sorted((p for p in phases if p.policy == policy), key=lambda p: p.rate)
            ax1.plot([p.rate for p in mine], [p.p(50) * 1000 for p in mine], marker="o", label=policy)
        ax1.set_xlabel("offered load (requests/s)")
        ax1.set_ylabel("TTFT p50 (ms)")
        ax1.legend()
        gains = [(r, by[("p2c", r)].p(50) / by[("cache_aware", r)].p(50))
                 for by in [{(p.policy, p.rate): p for p in phases}] for r in rates
                 if ("p2c", r) in by and ("cache_aware", r) in by]
        ax2.plot([r for r, _ in gains], [g for _, g in gains], marker="o", color="tab:green")
        ax2.axhline(2.0, color="grey", linestyle=":", linewidth=1)
        ax2.set_xlabel("offered load (requests/s)")
        ax2.set_ylabel("TTFT p50: p2c / cache_aware")
        for r, g in gains:
            ax2.text(r, g, f" {g:.2f}x", fontsize=8)
        fig.suptitle(note, fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        progress(f"plot: {path}")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = [p.policy for p in phases]
    x = range(len(phases))
    ax1.bar([i - 0.2 for i in x], [p.p(50) * 1000 for p in phases], 0.4, label="p50")
    ax1.bar([i + 0.2 for i in x], [p.p(90) * 1000 for p in phases], 0.4, label="p90")
    ax1.set_xticks(list(x), names)
    ax1.set_ylabel("time to first token (ms)")
    ax1.legend()
    ax2.bar(list(x), [p.cached_share * 100 for p in phases], 0.5, color="tab:green")
    ax2.set_xticks(list(x), names)
    ax2.set_ylabel("prompt tokens reused from the prefix cache (%)")
    for i, p in enumerate(phases):
        ax2.text(i, p.cached_share * 100 + 1, f"{p.tokens_per_s:.0f} tok/s", ha="center", fontsize=8)
    fig.suptitle(note, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    progress(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=448)
    parser.add_argument("--workers", type=int, default=4, help="closed-loop streams (without --rate)")
    parser.add_argument("--rate", default="12",
                        help="open loop: Poisson arrivals a second (0: --workers closed-loop streams); several, "
                             "comma-separated: the comparison at each")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--cache-share", type=float, default=0.73,
                        help="the system prompts' blocks as a share of the two replicas' prefix caches")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--twice", action=argparse.BooleanOptionalAction, default=True,
                        help="each policy twice, in the order A B C C B A, fresh system prompts each time")
    parser.add_argument("--plot", type=Path, default=Path("docs/prefix-routing.png"))
    args = parser.parse_args()
    rates = [float(r) for r in args.rate.split(",")]

    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(CATALOG.parent / "models" / MODEL / "tokenizer.json"))

    def count(text: str) -> int:
        return len(tokenizer.encode(text).ids)

    demand = args.prompts * (args.system_tokens // BLOCK)
    per_replica = math.ceil(demand / args.cache_share / 2)
    catalog = catalog_with({MODEL: {"prefix_cache_blocks": per_replica}}, CATALOG)
    words = vocabulary()
    policies = args.policies.split(",")
    one_rate = policies + policies[::-1] if args.twice else policies  # A B C C B A: drift weighs on each alike
    order = [(rate, policy) for rate in rates for policy in one_rate]
    plans = [workload(i, args, words, count) for i in range(len(order) + 1)]  # the last: the warm-up's
    progress(f"system prompts: {args.prompts} x {args.system_tokens} tokens ({demand} blocks of {BLOCK}), "
             f"{args.users} users each; prefix_cache_blocks {per_replica} a replica "
             f"(demand = {demand / (2 * per_replica):.0%} of the two, {demand / per_replica:.0%} of one)")

    state = Path(tempfile.mkdtemp(prefix="inferplane-bench-"))
    stack = LocalStack(StackConfig(state_dir=state, ports=dict.fromkeys(StackConfig().ports, 0), catalog=catalog,
                                   executors=2, trace_exporter="none", router={"routing_policy": policies[0]}),
                       log=progress)
    previous = signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(SystemExit(128 + s)))
    phases = {(rate, policy): Phase(policy, rate) for rate in rates for policy in policies}
    try:
        progress("starting the local stack (2 executors) ...")
        started = time.monotonic()
        stack.start()
        stack.write_env(stack.create_demo_key())
        env = read_env(state / "local.env")
        key, addr = env["INFERPLANE_API_KEY"], env["INFERPLANE_GRPC_ADDR"]
        progress(f"stack ready in {time.monotonic() - started:.0f}s; warming up")
        asyncio.run(run_phase(addr, key, plans[-1][:16], Phase("warm-up"), args.workers, args.max_tokens))
        current = policies[0]
        for i, (rate, policy) in enumerate(order):
            if policy != current:
                restart_router(stack, policy)
                current = policy
            phase = Phase(policy, rate)
            progress(f"phase {i + 1}/{len(order)} {policy} at {load(rate, args.workers)}: {len(plans[i])} requests ...")
            asyncio.run(run_phase(addr, key, plans[i], phase, args.workers, args.max_tokens, rate))
            progress(f"  {policy}: {phase.seconds:.1f}s, TTFT p50 {phase.p(50) * 1000:.1f} ms, "
                     f"cached {phase.cached_share:.0%}; TTFT median of a hit {median_ms(phase.hit_ttft)} "
                     f"({len(phase.hit_ttft)}), of a miss {median_ms(phase.miss_ttft)} ({len(phase.miss_ttft)}); "
                     f"CPUs {phase.cpu_share:.0%} busy")
            phases[(rate, policy)].merge(phase)
    finally:
        stack.stop()
        signal.signal(signal.SIGTERM, previous)

    done = list(phases.values())
    print(f"\nprefix routing on 2 executors: {args.prompts} system prompts x ~{args.system_tokens} tokens x "
          f"{args.users} users, max_tokens {args.max_tokens}, prefix_cache_blocks "
          f"{per_replica}/replica (demand {demand / (2 * per_replica):.0%} of both)")
    print(f"{'load':<28} {'policy':<12} {'requests':>8} {'TTFT p50':>10} {'TTFT p90':>10} {'tokens/s':>9} "
          f"{'cached':>7} {'CPUs busy':>9} {'p50 vs p2c':>10}")
    for p in done:
        base = phases.get((p.rate, "p2c"), p)
        print(f"{load(p.rate, args.workers):<28} {p.policy:<12} {len(p.ttft):>8} {p.p(50) * 1000:>8.1f}ms "
              f"{p.p(90) * 1000:>8.1f}ms {p.tokens_per_s:>9.1f} {p.cached_share:>7.0%} {p.cpu_share:>9.0%} "
              f"{base.p(50) / p.p(50):>9.2f}x" + (f"  ({p.failed} failed)" if p.failed else ""))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(done, args.plot, f"tiny-llama, 2 executors (CPU), {args.prompts} system prompts x {args.system_tokens} "
         f"tokens x {args.users} users; prefix cache {per_replica} blocks/replica")


if __name__ == "__main__":
    main()
