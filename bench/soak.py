"""Soak: 32 streams without pause for 10 minutes; errors and each process's memory over time.

    python -m bench.soak [--minutes 10] [--streams 32] [--max-tokens 64] [--new-prefixes WORDS] [--executors N]
                         [--state-dir DIR] [--out bench/results]

Starts a local stack on free ports (as ``inferplane up`` does) unless ``--state-dir`` names a running one.
Each of ``--streams`` clients streams completions back to back through the edge (REST, SSE, usage in the
last chunk) and checks every answer: status 200, a ``[DONE]``, the usage it was told matches the tokens of the
stream's chunks. ``--new-prefixes WORDS`` starts every prompt with WORDS random words of its own, so that every
request brings prefix blocks nobody has seen (the models' prefix caches and the router's cache-aware index churn at
their bounds). Every 5 s it samples the RSS of every service process and of the executor's children
(tritonserver, the Python backend stubs) from /proc, and the tokens delivered.

Passes (exit status 0) when there were 0 errors and no process grew more than ``--max-growth`` (10 %) from
minute 2 to the end (the first two minutes are warm-up: caches, allocator arenas, CUDA/torch pools). Prints a
table, writes ``soak.json`` and draws ``soak.png`` (RSS per process and delivered tokens/s over time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench._stack import local_stack, progress
from bench.mesh import MODEL, PROMPT, mesh_pids, proc_stats
from inferplane.cli.launcher import read_env

SAMPLE_EVERY_S = 5.0
WARMUP_S = 120.0


def children(pid: int) -> dict[str, int]:
    """Descendants of ``pid`` by name (``tritonserver``, ``stub-1``, ...): what the executor spawned."""
    parents: dict[int, int] = {}
    comm: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                comm[int(entry.name)] = (entry / "comm").read_text().strip()
            except (OSError, IndexError):
                continue
    out: dict[str, int] = {}
    frontier = [pid]
    stubs = 0
    while frontier:
        parent = frontier.pop()
        for child, p in sorted(parents.items()):
            if p == parent:
                frontier.append(child)
                name = comm.get(child, str(child))
                if "stub" in name or "python_b" in name:  # comm is cut at 15 characters
                    stubs += 1
                    name = f"python-stub-{stubs}"
                out[name] = child
    return out


def processes(state: Path) -> dict[str, int]:
    pids = mesh_pids(state)
    for name, pid in list(pids.items()):
        if name.startswith("executor"):
            pids.update({f"{name}/{c}": p for c, p in children(pid).items()})
    return pids


# Words a fresh prefix is drawn from (``--new-prefixes``): common English, several tokens apart in any vocabulary.
PREFIX_WORDS = ("river stone garden window paper music orange silver winter market yellow doctor bridge pocket "
                "letter engine forest candle butter planet rabbit circle hammer island jacket kitten ladder mirror "
                "needle pencil rocket saddle tunnel violin wallet zipper anchor basket cotton dragon feather").split()


class Soak:
    def __init__(self, base_url: str, key: str, max_tokens: int, new_prefix_words: int = 0) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120,
                                      limits=httpx.Limits(max_connections=256))
        self.max_tokens = max_tokens
        self.new_prefix_words = new_prefix_words
        self._rng = random.Random(20261205)
        self.requests = 0
        self.tokens = 0
        self.errors: list[str] = []

    async def one(self) -> None:
        prompt = PROMPT if not self.new_prefix_words else \
            " ".join(self._rng.choice(PREFIX_WORDS) for _ in range(self.new_prefix_words)) + "\n" + PROMPT
        body = {"model": MODEL, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0.8,
                "stream": True, "stream_options": {"include_usage": True}}
        done, usage, chunks, finish = False, None, 0, None
        async with self.http.stream("POST", "/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        raise RuntimeError(f"error event: {obj['error']}")
                    if obj.get("usage"):
                        usage = obj["usage"]
                    elif obj["choices"]:
                        chunks += bool(obj["choices"][0]["text"])
                        finish = obj["choices"][0]["finish_reason"] or finish
        # sampling may end a completion at its first token (end of text): no text chunk, one token, "stop"
        if (not done or usage is None or finish not in ("stop", "length")
                or not chunks <= usage["completion_tokens"] <= self.max_tokens
                or (finish == "length" and usage["completion_tokens"] != self.max_tokens)):
            raise RuntimeError(f"incomplete stream: done={done} finish={finish} usage={usage} chunks={chunks}")
        self.requests += 1
        self.tokens += usage["completion_tokens"]

    async def client(self, until: float) -> None:
        while time.monotonic() < until:
            try:
                await self.one()
            except Exception as exc:  # every failure is counted and shown, the soak goes on
                self.errors.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)


async def soak(state: Path, minutes: float, streams: int, max_tokens: int, new_prefix_words: int = 0) -> dict[str, Any]:
    env = read_env(state / "local.env")
    run = Soak(env["INFERPLANE_BASE_URL"], env["INFERPLANE_API_KEY"], max_tokens, new_prefix_words)
    pids = processes(state)
    started = time.monotonic()
    until = started + minutes * 60
    clients = [asyncio.ensure_future(run.client(until)) for _ in range(streams)]
    samples: list[dict[str, Any]] = []
    last_tokens, last_t = 0, started
    while time.monotonic() < until:
        await asyncio.sleep(SAMPLE_EVERY_S)
        now = time.monotonic()
        rss = {}
        for name, pid in pids.items():
            try:
                rss[name] = proc_stats(pid)[1] / 2**20
            except OSError:
                rss[name] = float("nan")  # it died: the soak fails on the error it caused
        samples.append({"t_s": now - started, "rss_mb": rss, "requests": run.requests, "errors": len(run.errors),
                        "tokens_per_s": (run.tokens - last_tokens) / (now - last_t)})
        last_tokens, last_t = run.tokens, now
        minute = (now - started) / 60
        progress(f"  {minute:5.1f} min  {run.requests:6d} requests  {samples[-1]['tokens_per_s']:7.1f} tok/s  "
                 f"{len(run.errors)} errors")
    await asyncio.gather(*clients)
    await run.http.aclose()
    return {"minutes": minutes, "streams": streams, "max_tokens": max_tokens, "new_prefix_words": new_prefix_words,
            "requests": run.requests,
            "tokens": run.tokens, "errors": run.errors, "samples": samples}


def growth(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per process: RSS at minute 2 (mean of the samples around it), at the end (mean of the last 4), growth %."""
    samples = result["samples"]
    warm = [s for s in samples if WARMUP_S - 15 <= s["t_s"] <= WARMUP_S + 15] or samples[:1]
    tail = samples[-4:]
    out = {}
    for name in samples[0]["rss_mb"]:
        a = sum(s["rss_mb"][name] for s in warm) / len(warm)
        b = sum(s["rss_mb"][name] for s in tail) / len(tail)
        out[name] = {"rss_mb_at_2min": a, "rss_mb_at_end": b, "growth_pct": (b - a) / a * 100 if a else float("nan")}
    return out


def table(result: dict[str, Any], grow: dict[str, dict[str, float]]) -> str:
    wall = result["samples"][-1]["t_s"] if result["samples"] else 0
    lines = [f"{result['minutes']:g} min at {result['streams']} streams: {result['requests']} requests, "
             f"{result['tokens']} tokens ({result['tokens'] / wall if wall else 0:.0f} tok/s), "
             f"{len(result['errors'])} errors",
             "", f"{'process':<30}{'RSS MB @2min':>14}{'RSS MB @end':>14}{'growth %':>10}"]
    lines += [f"{n:<30}{g['rss_mb_at_2min']:>14.1f}{g['rss_mb_at_end']:>14.1f}{g['growth_pct']:>10.2f}"
              for n, g in sorted(grow.items())]
    lines += [f"  error: {e}" for e in result["errors"][:20]]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t_s"] / 60 for s in samples]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name in sorted(samples[0]["rss_mb"]):
        a.plot(t, [s["rss_mb"][name] for s in samples], label=name)
    a.axvline(WARMUP_S / 60, color="grey", linestyle=":")
    a.set_xlabel("minutes")
    a.set_ylabel("RSS (MB)")
    a.set_yscale("log")
    a.set_title("RSS per process")
    a.legend(fontsize=7)
    b.plot(t, [s["tokens_per_s"] for s in samples])
    b.set_xlabel("minutes")
    b.set_ylabel("delivered tokens/s")
    b.set_title(f"{result['streams']} streams, {len(result['errors'])} errors")
    fig.suptitle("inferplane soak")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--new-prefixes", type=int, default=0, metavar="WORDS",
                        help="start every prompt with this many random words of its own (0: the same prompt)")
    parser.add_argument("--executors", type=int, default=1, help="executor replicas of the stack it starts")
    parser.add_argument("--max-growth", type=float, default=10.0, help="allowed RSS growth, %% (minute 2 to end)")
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped soak still stops its stack
    with local_stack(args.state_dir, executors=args.executors) as state:
        result = asyncio.run(soak(state, args.minutes, args.streams, args.max_tokens, args.new_prefixes))
    grow = growth(result)
    result["growth"] = grow
    print(table(result, grow))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "soak.png")
    print(f"\nwrote {args.out / 'soak.json'} and {args.out / 'soak.png'}")
    worst = max((g["growth_pct"] for g in grow.values()), default=0.0)
    ok = not result["errors"] and worst <= args.max_growth
    print(f"{'PASS' if ok else 'FAIL'}: {len(result['errors'])} errors, largest RSS growth {worst:.2f} % "
          f"(limit {args.max_growth:g} %)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
