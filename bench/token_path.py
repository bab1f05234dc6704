"""Issue 13's acceptance benchmark: the token path of the stack as ``inferplane up`` starts it, against Triton.

    python -m bench.token_path [--runs 2] [--state-dir DIR] [--streams 32] [--max-tokens 128] [--quick]

Starts a stack on free ports with the launcher's defaults (``StackConfig()``: the file trace exporter and its
default sampling, the default edge and channel modes), or measures the one ``inferplane up --state-dir DIR`` runs.
Each run, the same work goes through the mesh (REST through Envoy, the OpenAI wire format) and straight into
Triton's per-request contract (``tritonclient``), alternating, after an idle window that gives each process's idle
CPU rate:

- **tokens**: ``--streams`` concurrent streamed completions of ``--max-tokens`` tokens: delivered tokens/s,
  TTFT and inter-token p50 (per request: time after the first token over the tokens after it), CPU of every
  process from /proc with idle subtracted, and the per-hop message counters each service exports
  (``*_frames_total``, ``*_sse_writes_total``, Triton's responses ...) per token;
- **unary**: 1-token completions at concurrency 1: added p50 latency, and CPU per request;
- **rps**: 8-token completions at concurrency 16: requests/s;
- **batching**: tokens/s of ``--streams`` streams over 1 stream, through the ``openai`` SDK and straight into Triton.

"Mesh" is every process but tritonserver and its Python-backend stubs. The per-request part of the mesh's CPU
comes from the unary phase, the per-token part from the tokens phase less that. Figures are printed beside the
issue's targets (reported, never asserted); ``bench/results/token_path.json`` and ``token_path.png`` keep them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench._stack import local_stack, progress
from bench.mesh import MODEL, PROMPT, Direct, Mesh, pct, snapshot
from bench.soak import processes
from inferplane.cli.launcher import read_env
from inferplane.common.catalog import load_catalog
from inferplane.tokenization.bundle import TokenizerBundle

# Counters that count messages crossing a hop (whatever each service calls them), read from every /metrics.
HOP_COUNTER = re.compile(r"^(inferplane_\w*(frames|sse_writes|responses|messages|chunks)\w*_total)(\{[^}]*\})? "
                         r"([0-9.e+]+)$")
# After a mesh phase, the wait (inside its CPU window; idle subtracted) for its usage records to reach metering: the
# router's outbox lingers 1 s before it sends a batch (``UsageOutbox.linger_s``), then metering commits it.
SETTLE_S = 2.5
TARGETS = {"mesh_us_per_token": 25.0, "mesh_ms_per_request": 1.5, "added_p50_ms": 2.0, "tokens_ratio": 0.95,
           "ttft_ratio": 1.2, "itl_ratio": 1.1, "rps_ratio": 0.9, "batching_gain": 8.0}


def is_triton(name: str) -> bool:
    return "/" in name  # bench.soak.processes names the executor's children "executor/tritonserver", ...


def metrics_urls(state: Path, processes: dict[str, int]) -> list[str]:
    """Every Prometheus endpoint of the stack: each service's, the gateway's (when it runs apart: in the router's
    process it serves the router's registry, counted once), Triton's."""
    settings = yaml.safe_load((state / "stack.yaml").read_text())
    urls = []
    for section in settings.values():
        if not isinstance(section, dict):
            continue
        server = section.get("server") or {}
        if server.get("metrics_port"):
            urls.append(f"http://{server.get('host', '127.0.0.1')}:{server['metrics_port']}/metrics")
        triton = section.get("triton") or {}
        if triton.get("metrics_port"):
            urls.append(f"http://127.0.0.1:{triton['metrics_port']}/metrics")
        if "router_addr" in section and section.get("port") and "gateway" in processes:
            urls.append(f"http://{section.get('host', '127.0.0.1')}:{section['port']}/metrics")
    return urls


async def hop_counters(http: httpx.AsyncClient, urls: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for url in urls:
        try:
            text = (await http.get(url, timeout=5)).text
        except httpx.HTTPError:
            continue
        for line in text.splitlines():
            m = HOP_COUNTER.match(line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(4))
    return out


class Phase:
    """CPU of every process over one phase, less its idle rate."""

    def __init__(self, pids: dict[str, int], idle: dict[str, float]) -> None:
        self.pids, self.idle = pids, idle

    def __enter__(self) -> Phase:
        self.before, self.t0 = snapshot(self.pids), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        after, wall = snapshot(self.pids), time.perf_counter() - self.t0
        self.wall = wall
        self.busy = {n: max(0.0, after[n][0] - self.before[n][0] - self.idle.get(n, 0.0) * wall)
                     for n in after if n in self.before}

    def mesh(self) -> float:
        return sum(v for n, v in self.busy.items() if not is_triton(n))

    def triton(self) -> float:
        return sum(v for n, v in self.busy.items() if is_triton(n))


async def openai_streams(base_url: str, key: str, n: int, max_tokens: int) -> float:
    """Tokens/s of ``n`` concurrent streamed completions through the ``openai`` SDK."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)

    async def one() -> int:
        stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        tokens = 0
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*[one() for _ in range(n)]))
    rate = tokens / (time.perf_counter() - t0)
    await client.close()
    return rate


async def stream_phase(path: Direct | Mesh, n: int, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*[path.run(max_tokens) for _ in range(n)])
    wall = time.perf_counter() - t0
    # inter-token latency per request (its time per output token after the first: vLLM's TPOT); per-chunk gaps
    # would read 0 where several tokens share a response
    itl = [(times[-1] - times[0]) * 1000 / (n - 1) for _, times, n in results if n > 1 and len(times) > 1]
    tokens = sum(r[2] for r in results)
    return {"tokens": tokens, "tokens_per_s": tokens / wall, "ttft_p50_ms": pct([r[0] * 1000 for r in results], 0.5),
            "itl_p50_ms": pct(itl, 0.5), "sse_chunks": sum(len(r[1]) for r in results)}


async def one_run(state: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = read_env(state / "local.env")
    settings = yaml.safe_load((state / "stack.yaml").read_text())
    model = load_catalog(Path(settings["router"]["catalog"])).get(MODEL)
    assert model is not None
    direct = Direct(f"127.0.0.1:{settings['executor']['triton']['grpc_port']}", model.triton_model,
                    TokenizerBundle.from_dir(model.tokenizer))
    mesh = Mesh(env["INFERPLANE_BASE_URL"], env["INFERPLANE_API_KEY"])
    scrape = httpx.AsyncClient()
    pids = processes(state)
    urls = metrics_urls(state, pids)
    n_unary, n_rps = (20, 32) if args.quick else (100, 160)
    await asyncio.gather(direct.run(4), mesh.run(4))  # warm: connections, caches

    progress(f"  idle window {args.idle_s:g}s ({', '.join(sorted(pids))}) ...")
    before, t0 = snapshot(pids), time.perf_counter()
    await asyncio.sleep(args.idle_s)
    idle = {n: (snapshot(pids)[n][0] - before[n][0]) / (time.perf_counter() - t0) for n in before}
    out: dict[str, Any] = {"idle_cpu_rate": idle}

    progress(f"  tokens: {args.streams} streams x {args.max_tokens} tokens, direct then mesh ...")
    with Phase(pids, idle) as p:
        out["direct_tokens"] = await stream_phase(direct, args.streams, args.max_tokens)
    out["direct_tokens"]["triton_us_per_token"] = p.triton() * 1e6 / out["direct_tokens"]["tokens"]
    # Triton's model publishes its response counter at most once a second: wait, so that the direct phase's last
    # responses are not counted in the mesh's window
    await asyncio.sleep(SETTLE_S)
    hops_before = await hop_counters(scrape, urls)
    with Phase(pids, idle) as p:
        out["mesh_tokens"] = m = await stream_phase(mesh, args.streams, args.max_tokens)
        await asyncio.sleep(SETTLE_S)  # usage records reach metering after the streams end
    hops = await hop_counters(scrape, urls)
    m["cpu_us_per_token"] = {n: v * 1e6 / m["tokens"] for n, v in p.busy.items()}
    m["mesh_us_per_token"] = p.mesh() * 1e6 / m["tokens"]
    m["triton_us_per_token"] = p.triton() * 1e6 / m["tokens"]
    m["hop_messages_per_token"] = {k: (hops[k] - hops_before.get(k, 0.0)) / m["tokens"] for k in hops
                                   if hops[k] != hops_before.get(k, 0.0)}

    progress(f"  unary: {n_unary} 1-token completions at concurrency 1, direct then mesh ...")
    lat: dict[str, list[float]] = {"direct": [], "mesh": []}
    for name, path in (("direct", direct), ("mesh", mesh)):
        with Phase(pids, idle) as p:
            for _ in range(n_unary):
                t = time.perf_counter()
                await path.run(1)
                lat[name].append((time.perf_counter() - t) * 1000)
            if name == "mesh":
                await asyncio.sleep(SETTLE_S)
        if name == "mesh":
            out["mesh_ms_per_request"] = p.mesh() * 1e3 / n_unary
            out["cpu_ms_per_request"] = {n: v * 1e3 / n_unary for n, v in p.busy.items()}
    out["unary_p50_ms"] = {k: pct(v, 0.5) for k, v in lat.items()}

    progress(f"  rps: {n_rps} 8-token completions at concurrency 16, direct then mesh ...")
    rps = {}
    for name, path in (("direct", direct), ("mesh", mesh)):
        sem = asyncio.Semaphore(16)

        async def one(path: Direct | Mesh = path, sem: asyncio.Semaphore = sem) -> None:
            async with sem:
                await path.run(8)

        t = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(n_rps)])
        rps[name] = n_rps / (time.perf_counter() - t)
    out["requests_per_s"] = rps

    progress(f"  batching: 1 and {args.streams} streams, openai SDK then direct ...")
    base, key = env["INFERPLANE_BASE_URL"], env["INFERPLANE_API_KEY"]
    sdk_1 = await openai_streams(base, key, 1, args.max_tokens)
    sdk_n = await openai_streams(base, key, args.streams, args.max_tokens)
    d_1 = (await stream_phase(direct, 1, args.max_tokens))["tokens_per_s"]
    d_n = (await stream_phase(direct, args.streams, args.max_tokens))["tokens_per_s"]
    out["batching_gain"] = {"openai_sdk": sdk_n / sdk_1, "direct": d_n / d_1}

    per_request_cpu = out["mesh_ms_per_request"] / 1e3
    m["mesh_us_per_token_net"] = m["mesh_us_per_token"] - per_request_cpu * 1e6 * args.streams / m["tokens"]
    out["figures"] = {
        "mesh_us_per_token": m["mesh_us_per_token"],
        "mesh_ms_per_request": out["mesh_ms_per_request"],
        "added_p50_ms": out["unary_p50_ms"]["mesh"] - out["unary_p50_ms"]["direct"],
        "tokens_ratio": m["tokens_per_s"] / out["direct_tokens"]["tokens_per_s"],
        "ttft_ratio": m["ttft_p50_ms"] / out["direct_tokens"]["ttft_p50_ms"],
        "itl_ratio": m["itl_p50_ms"] / out["direct_tokens"]["itl_p50_ms"],
        "rps_ratio": rps["mesh"] / rps["direct"],
        "batching_gain": out["batching_gain"]["openai_sdk"],
    }
    await mesh.http.aclose()
    await direct.client.close()
    await scrape.aclose()
    return out


LOWER_IS_BETTER = {"mesh_us_per_token", "mesh_ms_per_request", "added_p50_ms", "ttft_ratio", "itl_ratio"}


def table(runs: list[dict[str, Any]]) -> str:
    lines = [f"{'figure':<34}{'target':>10}" + "".join(f"{'run ' + str(i + 1):>12}" for i in range(len(runs)))]
    for name, target in TARGETS.items():
        vals = [r["figures"][name] for r in runs]
        ok = [(v <= target) if name in LOWER_IS_BETTER else (v >= target) for v in vals]
        sign = "<=" if name in LOWER_IS_BETTER else ">="
        cells = "".join(f"{format(v, '.2f') + (' ok' if o else ' --'):>12}" for v, o in zip(vals, ok, strict=True))
        lines.append(f"{name:<34}{sign + format(target, 'g'):>10}{cells}")
    last = runs[-1]
    m, d = last["mesh_tokens"], last["direct_tokens"]
    lines.append(f"\nlast run, {m['tokens']} tokens: mesh {m['tokens_per_s']:.1f} tokens/s vs direct "
                 f"{d['tokens_per_s']:.1f}; TTFT p50 {m['ttft_p50_ms']:.1f} vs {d['ttft_p50_ms']:.1f} ms; ITL p50 "
                 f"{m['itl_p50_ms']:.1f} vs {d['itl_p50_ms']:.1f} ms; {m['tokens'] / max(m['sse_chunks'], 1):.2f} "
                 f"tokens per SSE chunk")
    lines.append(f"mesh CPU per token net of its per-request part: {m['mesh_us_per_token_net']:.1f} us; Triton's own "
                 f"CPU per token: {m['triton_us_per_token']:.1f} us through the mesh, {d['triton_us_per_token']:.1f} "
                 f"us direct")
    lines.append(f"\n{'process':<28}{'us/token (streams)':>20}{'ms/request (1 token)':>22}")
    for n in sorted(m["cpu_us_per_token"], key=lambda n: (is_triton(n), n)):
        lines.append(f"{n:<28}{m['cpu_us_per_token'][n]:>20.1f}{last['cpu_ms_per_request'].get(n, 0.0):>22.2f}")
    lines.append("\nmessages per delivered token, by hop counter:")
    lines += [f"  {k:<60}{v:>8.3f}" for k, v in sorted(m["hop_messages_per_token"].items())] or ["  (none exported)"]
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = runs[-1]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    names = list(TARGETS)
    ratios = [last["figures"][n] / TARGETS[n] for n in names]
    colors = ["tab:green" if ((r <= 1) if n in LOWER_IS_BETTER else (r >= 1)) else "tab:red"
              for n, r in zip(names, ratios, strict=True)]
    ax.barh(names, ratios, color=colors)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.set_title("figure / target (green: met)")
    ax = axes[1]
    cpu = last["mesh_tokens"]["cpu_us_per_token"]
    procs = sorted(cpu, key=lambda n: (is_triton(n), n))
    ax.bar(procs, [cpu[n] for n in procs], color=["tab:gray" if is_triton(n) else "tab:blue" for n in procs])
    ax.axhline(TARGETS["mesh_us_per_token"], color="red", lw=1, label="mesh target (all blue bars together)")
    ax.set_ylabel("CPU us per delivered token")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    ax.legend(fontsize=7)
    fig.suptitle("inferplane token path vs direct Triton (same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, help="measure the stack `inferplane up --state-dir DIR` runs")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="fewer unary and rps requests")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    runs = []
    # the launcher's defaults, as `inferplane up` runs them (bench._stack otherwise turns tracing off)
    with local_stack(args.state_dir, trace_exporter="file") as state:
        for i in range(args.runs):
            progress(f"run {i + 1}/{args.runs}")
            runs.append(asyncio.run(one_run(state, args)))
    print(table(runs))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "token_path.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "runs": runs}, indent=2))
    plot(runs, args.out / "token_path.png")
    print(f"\nwrote {args.out / 'token_path.json'} and {args.out / 'token_path.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
