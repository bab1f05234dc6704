"""What the Envoy edge adds to a request: p50 of the same small request with and without Envoy, one run.

    python -m bench.envoy_overhead [--requests 1000] [--state-dir DIR]

Starts a local stack (as ``inferplane up`` does, on free ports) unless ``--state-dir`` names one that
runs already, then alternates, request by request on kept-alive connections: ``GET /v1/models`` (the
gateway, the router's ListModels, the cached key check) straight to the gateway and through Envoy, and
the router's gRPC ``ListModels`` straight to the router and through Envoy. Then the hop alone: the
edge's generated config in front of a static upstream (a second Envoy answering from memory), so the
edge's own cost is seen apart from the Python services it shares the cores with. Prints each p50 and
the differences (the goal for the edge: at most 0.5 ms); writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import yaml

from bench._stack import local_stack
from inferplane.cli.launcher import free_port, read_env
from inferplane.edge.envoy import EdgeSettings, EnvoyProcess, envoy_command
from inferplane.v1 import router_pb2, router_pb2_grpc


def timed(call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def quantiles_ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": statistics.median(ordered) * 1000, "p90_ms": ordered[int(len(ordered) * 0.9)] * 1000,
            "p99_ms": ordered[int(len(ordered) * 0.99)] * 1000}


def rest_call(client: httpx.Client) -> Callable[[], object]:
    def call() -> object:
        resp = client.get("/v1/models")
        assert resp.status_code == 200, resp.text
        return resp

    return call


def grpc_call(stub: router_pb2_grpc.RouterServiceStub, key: str) -> Callable[[], object]:
    metadata = (("authorization", f"Bearer {key}"),)
    return lambda: stub.ListModels(router_pb2.ListModelsRequest(), metadata=metadata, timeout=10)


def static_upstream(port: int, admin_port: int) -> dict[str, object]:
    """An Envoy bootstrap that answers every request with a small JSON body from memory."""
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "static",
           "route_config": {"virtual_hosts": [{"name": "static", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": '{"data":[]}'}}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "static_resources": {"listeners": [{"name": "static", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}, "filter_chains": [{"filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}]}}


def hop_alone(requests: int) -> dict[str, list[float]]:
    """p50 samples of GET straight to a static upstream and through the edge's config in front of it."""
    work = Path(tempfile.mkdtemp(prefix="inferplane-hop-"))
    port = free_port()
    (work / "static.yaml").write_text(yaml.safe_dump(static_upstream(port, free_port())))
    upstream = subprocess.Popen(envoy_command(work / "static.yaml", log_level="error", concurrency=1))
    edge = EnvoyProcess(EdgeSettings(port=free_port(), admin_port=free_port(), gateway_addr=f"127.0.0.1:{port}",
                                     access_log_path=str(work / "access.log")), work)
    samples: dict[str, list[float]] = {"hop_direct": [], "hop_envoy": []}
    try:
        edge.start()
        conns = {"hop_direct": http.client.HTTPConnection("127.0.0.1", port),
                 "hop_envoy": http.client.HTTPConnection("127.0.0.1", edge.settings.port)}

        def get(conn: http.client.HTTPConnection) -> None:
            conn.request("GET", "/v1/models")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status

        for _ in range(50):
            for conn in conns.values():
                get(conn)
        for _ in range(requests):
            for name, conn in conns.items():
                samples[name].append(timed(functools.partial(get, conn)))
    finally:
        edge.stop()
        upstream.terminate()
        upstream.wait()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests per path")
    parser.add_argument("--state-dir", type=Path, help="a running stack's state dir (default: start one)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/envoy_overhead.json"))
    args = parser.parse_args()

    samples: dict[str, list[float]] = {"rest_direct": [], "rest_envoy": [], "grpc_direct": [], "grpc_envoy": []}
    with local_stack(args.state_dir, trace_exporter="file") as state:
        env = read_env(state / "local.env")
        settings = yaml.safe_load((state / "stack.yaml").read_text())
        key = env["INFERPLANE_API_KEY"]
        gw, router = settings["gateway"], settings["router"]["server"]
        edge = env["INFERPLANE_BASE_URL"].removesuffix("/v1")
        headers = {"authorization": f"Bearer {key}"}
        with httpx.Client(base_url=f"http://{gw['host']}:{gw['port']}", headers=headers) as direct_http, \
                httpx.Client(base_url=edge, headers=headers) as edge_http, \
                grpc.insecure_channel(f"{router['host']}:{router['port']}") as direct_ch, \
                grpc.insecure_channel(env["INFERPLANE_GRPC_ADDR"]) as edge_ch:
            calls = {"rest_direct": rest_call(direct_http), "rest_envoy": rest_call(edge_http),
                     "grpc_direct": grpc_call(router_pb2_grpc.RouterServiceStub(direct_ch), key),
                     "grpc_envoy": grpc_call(router_pb2_grpc.RouterServiceStub(edge_ch), key)}
            for call in calls.values():  # warm-up: connections, the key cache
                for _ in range(20):
                    call()
            for i in range(args.requests):
                # Alternate the order too, so neither path always runs right after the other.
                order = list(calls) if i % 2 == 0 else list(reversed(calls))
                for name in order:
                    samples[name].append(timed(calls[name]))

    samples.update(hop_alone(args.requests))
    summary = {name: quantiles_ms(s) for name, s in samples.items()}
    print(f"\n{args.requests} requests per path, alternating; milliseconds")
    print(f"{'path':<13}{'p50':>9}{'p90':>9}{'p99':>9}")
    for name, q in summary.items():
        print(f"{name:<13}{q['p50_ms']:>9.3f}{q['p90_ms']:>9.3f}{q['p99_ms']:>9.3f}")
    added = {kind: summary[f"{kind}_envoy"]["p50_ms"] - summary[f"{kind}_direct"]["p50_ms"]
             for kind in ("rest", "grpc", "hop")}
    for kind, ms in added.items():
        what = {"rest": "REST through the mesh", "grpc": "gRPC through the mesh", "hop": "the hop alone"}[kind]
        print(f"Envoy adds {ms:+.3f} ms at p50: {what} (goal <= 0.5 ms)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"requests": args.requests, "summary": summary, "added_p50_ms": added},
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
