"""The mesh against Triton, in one run: latency, throughput, streaming, CPU and memory per service.

    python -m bench.mesh [--state-dir DIR] [--quick] [--soak-minutes 0]

Starts a local stack on free ports (as ``inferplane up`` does) unless ``--state-dir`` names a running
one. For each figure it measures the same work two ways, alternating: through the mesh (Envoy → gateway
→ router → tokenizer/executor/Triton → metering, REST with the ``openai`` client's wire format via
httpx, and gRPC through Envoy) and straight against the same Triton model (``tritonclient.grpc.aio``,
the same prompt token ids). Figures:

- unary latency p50/p99 at concurrency 1 (a 1-token completion),
- requests/s at concurrency 16 (8-token completions),
- streaming at 32 concurrent streams: time to first token, inter-token latency, delivered tokens/s,
- CPU seconds per request of each mesh process and its RSS (from /proc), over the whole run.

Prints a table, writes ``bench/results/mesh.json`` and draws ``bench/results/mesh.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import tritonclient.grpc.aio as triton_aio
import yaml

from bench._stack import catalog_with, local_stack
from inferplane.cli.launcher import read_env
from inferplane.common.catalog import load_catalog
from inferplane.executor.triton_client import GenerateParams, build_inputs
from inferplane.tokenization.bundle import TokenizerBundle

MODEL = "tiny-llama"
PROMPT = "Return the"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds user+system, RSS bytes) of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def snapshot(pids: dict[str, int]) -> dict[str, tuple[float, int]]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = proc_stats(pid)
        except OSError:
            continue  # it exited
    return out


def mesh_pids(state: Path) -> dict[str, int]:
    """The service processes of a stack (from the launcher's own records: pid files are not kept, so scan)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [c.decode(errors="replace") for c in cmd]
        if str(state / "stack.yaml") in text and "serve" in text:
            name = text[text.index("serve") + 1]
            if "--section" in text:
                name = text[text.index("--section") + 1]
            out[name] = int(entry.name)
        elif text and text[0].endswith("envoy") and str(state / "envoy.yaml") in text:
            out["envoy"] = int(entry.name)
    return out


class Direct:
    def __init__(self, url: str, triton_model: str, bundle: TokenizerBundle) -> None:
        self.client = triton_aio.InferenceServerClient(url)
        self.model = triton_model
        self.ids = bundle.encode(PROMPT)
        self.stops = list(bundle.stop_token_ids)

    async def run(self, max_tokens: int) -> tuple[float, list[float], int]:
        """(ttft, token arrival times, tokens) of one greedy generation."""
        params = GenerateParams(self.ids, max_tokens, temperature=0.0, stop_token_ids=self.stops)

        async def reqs() -> Any:
            yield {"model_name": self.model, "inputs": build_inputs(params)}

        t0 = time.perf_counter()
        times: list[float] = []
        async for result, error in self.client.stream_infer(reqs()):
            assert error is None, error
            ids = result.as_numpy("token_ids")
            if ids is not None and ids.size:
                times += [time.perf_counter() - t0] * int(ids.size)
            if result.as_numpy("finish_reason") is not None:
                break
        return (times[0] if times else float("nan")), times, len(times)


class Mesh:
    def __init__(self, base_url: str, key: str) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120,
                                      limits=httpx.Limits(max_connections=64))

    async def run(self, max_tokens: int) -> tuple[float, list[float], int]:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        times: list[float] = []
        tokens = 0
        async with self.http.stream("POST", "/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                obj = json.loads(line[6:])
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                elif obj["choices"] and obj["choices"][0]["text"]:
                    times.append(time.perf_counter() - t0)
        return (times[0] if times else float("nan")), times, tokens


async def unary(path: Direct | Mesh, n: int) -> dict[str, float]:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        await path.run(1)
        lat.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)}


async def throughput(path: Direct | Mesh, n: int, concurrency: int) -> dict[str, float]:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await path.run(8)

    t0 = time.perf_counter()
    await asyncio.gather(*[one() for _ in range(n)])
    return {"requests_per_s": n / (time.perf_counter() - t0)}


async def streams(path: Direct | Mesh, n: int, max_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*[path.run(max_tokens) for _ in range(n)])
    wall = time.perf_counter() - t0
    ttft = [r[0] * 1000 for r in results]
    itl = [(b - a) * 1000 for _, times, _ in results for a, b in itertools.pairwise(times)]
    tokens = sum(r[2] for r in results)
    return {"ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99), "itl_p50_ms": pct(itl, 0.5),
            "itl_p99_ms": pct(itl, 0.99), "tokens_per_s": tokens / wall, "tokens": tokens}


async def measure(state: Path, quick: bool) -> dict[str, Any]:
    env = read_env(state / "local.env")
    settings = yaml.safe_load((state / "stack.yaml").read_text())
    model = load_catalog(Path(settings["router"]["catalog"])).get(MODEL)
    assert model is not None
    direct = Direct(f"127.0.0.1:{settings['executor']['triton']['grpc_port']}", model.triton_model,
                    TokenizerBundle.from_dir(model.tokenizer))
    mesh = Mesh(env["INFERPLANE_BASE_URL"], env["INFERPLANE_API_KEY"])
    n_unary, n_tput, n_streams, stream_tokens = (20, 32, 32, 32) if quick else (100, 160, 32, 128)
    pids = mesh_pids(state)
    before = snapshot(pids)
    await direct.run(4)
    await mesh.run(4)
    out: dict[str, Any] = {"direct": {}, "mesh": {}}
    mesh_requests = 0
    steps = [("unary", lambda p: unary(p, n_unary), n_unary),
             ("throughput_c16", lambda p: throughput(p, n_tput, 16), n_tput),
             ("streams_32", lambda p: streams(p, n_streams, stream_tokens), n_streams)]
    for name, fn, count in steps:
        print(f"  {name}: direct ...", file=sys.stderr, flush=True)
        out["direct"][name] = await fn(direct)
        print(f"  {name}: mesh ...", file=sys.stderr, flush=True)
        out["mesh"][name] = await fn(mesh)
        mesh_requests += count
    after = snapshot(pids)
    out["processes"] = {name: {"cpu_s": after[name][0] - before[name][0],
                               "cpu_ms_per_request": (after[name][0] - before[name][0]) * 1000 / (mesh_requests + 2),
                               "rss_mb": after[name][1] / 2**20} for name in after if name in before}
    out["mesh_requests"] = mesh_requests
    await mesh.http.aclose()
    await direct.client.close()
    return out


def table(r: dict[str, Any]) -> str:
    d, m = r["direct"], r["mesh"]
    rows = [("unary p50 ms (c=1)", d["unary"]["p50_ms"], m["unary"]["p50_ms"]),
            ("unary p99 ms (c=1)", d["unary"]["p99_ms"], m["unary"]["p99_ms"]),
            ("requests/s (c=16)", d["throughput_c16"]["requests_per_s"], m["throughput_c16"]["requests_per_s"]),
            ("TTFT p50 ms (32 streams)", d["streams_32"]["ttft_p50_ms"], m["streams_32"]["ttft_p50_ms"]),
            ("ITL p50 ms (32 streams)", d["streams_32"]["itl_p50_ms"], m["streams_32"]["itl_p50_ms"]),
            ("ITL p99 ms (32 streams)", d["streams_32"]["itl_p99_ms"], m["streams_32"]["itl_p99_ms"]),
            ("tokens/s (32 streams)", d["streams_32"]["tokens_per_s"], m["streams_32"]["tokens_per_s"])]
    lines = [f"{'figure':<28}{'direct':>10}{'mesh':>10}{'mesh/direct':>13}"]
    lines += [f"{n:<28}{a:>10.2f}{b:>10.2f}{(b / a if a else float('nan')):>13.2f}" for n, a, b in rows]
    lines.append(f"\n{'process':<12}{'CPU ms/request':>16}{'RSS MB':>10}")
    lines += [f"{n:<12}{p['cpu_ms_per_request']:>16.2f}{p['rss_mb']:>10.1f}" for n, p in sorted(r["processes"].items())]
    mesh_cpu = sum(p["cpu_ms_per_request"] for n, p in r["processes"].items() if n not in ("executor",) and
                   not n.startswith("executor"))
    lines.append(f"{'mesh total':<12}{mesh_cpu:>16.2f}   (all but the executor, whose Triton is not counted)")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, m = r["direct"], r["mesh"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    groups = [("unary latency (ms, c=1)", ["p50_ms", "p99_ms"], "unary"),
              ("32 streams (ms)", ["ttft_p50_ms", "itl_p50_ms", "itl_p99_ms"], "streams_32")]
    for ax, (title, keys, step) in zip(axes[:2], groups, strict=True):
        x = range(len(keys))
        ax.bar([i - 0.2 for i in x], [d[step][k] for k in keys], 0.4, label="direct Triton")
        ax.bar([i + 0.2 for i in x], [m[step][k] for k in keys], 0.4, label="mesh")
        ax.set_xticks(list(x), keys)
        ax.set_title(title)
        ax.legend()
    ax = axes[2]
    names = ["requests/s (c=16)", "tokens/s (32 streams)"]
    vals_d = [d["throughput_c16"]["requests_per_s"], d["streams_32"]["tokens_per_s"]]
    vals_m = [m["throughput_c16"]["requests_per_s"], m["streams_32"]["tokens_per_s"]]
    ax.bar([-0.2, 0.8], vals_d, 0.4, label="direct Triton")
    ax.bar([0.2, 1.2], vals_m, 0.4, label="mesh")
    ax.set_xticks([0, 1], names)
    ax.set_title("throughput")
    ax.legend()
    fig.suptitle("inferplane mesh vs direct Triton (same run, same model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--stream-interval", type=int, default=None,
                        help=f"start the stack with {MODEL}'s catalog stream_interval set to this")
    args = parser.parse_args()
    config = {}
    if args.stream_interval is not None:
        if args.state_dir is not None:
            parser.error("--stream-interval starts a stack of its own: leave out --state-dir")
        config["catalog"] = catalog_with({MODEL: {"stream_interval": args.stream_interval}})
    with local_stack(args.state_dir, **config) as state:
        result = asyncio.run(measure(state, args.quick))
    result["stream_interval"] = args.stream_interval or 1
    print(f"{MODEL} stream_interval: {result['stream_interval']}")
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mesh.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "mesh.png")
    print(f"\nwrote {args.out / 'mesh.json'} and {args.out / 'mesh.png'}")


if __name__ == "__main__":
    main()
