"""Service tiers and the fair queue at saturation, in one run, through the real router, metering and an executor on
a real Triton serving tiny-llama (in this process, over gRPC on loopback).

    python -m bench.routing_policies [--seconds 12] [--slots 4] [--workers 24] [--max-tokens 24]

tiny-llama gets ``--slots`` slots (``concurrency_per_replica``), so ``--workers`` closed-loop streams keep its
queue full. Phases of ``--seconds`` each:

1. tiers: half the workers send flex requests, half priority, into a queue of ``--tier-queue`` (fewer than wait):
   TTFT p50/p90 of each, and how many of each were refused (flex: shed with 429);
2. fair queue on: one tenant floods with ``--workers`` closed-loop streams, another sends a request every
   ``--trickle-every-s`` (an open loop: the same demand whatever the answers' speed): the quiet tenant's TTFT p50
   and the flooding tenant's tokens/s;
3. the same with the fair queue off (arrival order within a tier); phases 2 and 3 run twice, on-off-off-on, so
   the shared machine's drift weighs on both alike.

Prints the figures and their ratios (same run, same machine); asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench._stack import catalog_with, progress
from inferplane.assets import CATALOG
from inferplane.cli.launcher import free_port
from inferplane.common.settings import ServerSettings
from inferplane.executor.main import Executor
from inferplane.executor.settings import ExecutorSettings, TritonSettings
from inferplane.metering.main import MeteringSettings, build_server
from inferplane.metering.store import MeteringStore
from inferplane.router.main import Router
from inferplane.router.settings import RouterSettings
from inferplane.v1 import common_pb2, router_pb2, router_pb2_grpc

MODEL = "tiny-llama"
TIERS = {"flex": common_pb2.SERVICE_TIER_FLEX, "priority": common_pb2.SERVICE_TIER_PRIORITY,
         "default": common_pb2.SERVICE_TIER_DEFAULT}


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    refused: int = 0

    def p(self, q: float) -> float:
        if not self.ttft:
            return float("nan")
        return statistics.quantiles(self.ttft, n=100)[int(q) - 1] if len(self.ttft) > 1 else self.ttft[0]


async def worker(stub: router_pb2_grpc.RouterServiceStub, key: str, tier: str, until: float, tally: Tally,
                 max_tokens: int, n: int) -> None:
    """A closed loop: one request after another until ``until``."""
    while time.monotonic() < until:
        await one(stub, key, tier, tally, max_tokens, n)


async def trickle(stub: router_pb2_grpc.RouterServiceStub, key: str, until: float, tally: Tally, max_tokens: int,
                  every_s: float) -> None:
    """An open loop: a request every ``every_s`` whatever the answers' speed (the same demand in every phase)."""
    tasks: list[asyncio.Future[None]] = []
    while time.monotonic() < until:
        tasks.append(asyncio.ensure_future(one(stub, key, "default", tally, max_tokens, len(tasks))))
        await asyncio.sleep(every_s)
    await asyncio.gather(*tasks)


async def one(stub: router_pb2_grpc.RouterServiceStub, key: str, tier: str, tally: Tally, max_tokens: int,
              n: int) -> None:
    """One streamed request: its TTFT, tokens, or its refusal."""
    req = router_pb2.GenerateRequest(model=MODEL, max_tokens=max_tokens, service_tier=TIERS[tier])
    req.chat.messages.add(role="user", content=f"Explain item {n}.")
    req.sampling.ignore_eos = True
    started, first = time.monotonic(), None
    try:
        async for msg in stub.Generate(req, metadata=(("authorization", f"Bearer {key}"),), timeout=120):
            if first is None and msg.token_count:
                first = time.monotonic() - started
            if msg.HasField("usage"):
                tally.tokens += msg.usage.completion_tokens
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        tally.refused += 1
        await asyncio.sleep(0.2)  # retry-after is 1 s; come back a little sooner to keep the pressure
        return
    if first is not None:
        tally.ttft.append(first)


async def phase(stub: router_pb2_grpc.RouterServiceStub, groups: list[tuple[str, str, str, int]], seconds: float,
                max_tokens: int, trickle_key: str = "", every_s: float = 0.5) -> dict[str, Tally]:
    """``groups``: (name, key, tier, closed-loop streams) → a tally per name; with ``trickle_key``, also "quiet": a
    request every ``every_s`` with that key."""
    until = time.monotonic() + seconds
    tallies: dict[str, Tally] = {}
    tasks = []
    for name, key, tier, streams in groups:
        tally = tallies.setdefault(name, Tally())
        tasks += [worker(stub, key, tier, until, tally, max_tokens, i) for i in range(streams)]
    if trickle_key:
        tasks.append(trickle(stub, trickle_key, until, tallies.setdefault("quiet", Tally()), max_tokens, every_s))
    await asyncio.gather(*tasks)
    return tallies


def set_fair(router: Router, fair: bool) -> None:
    router.engine.capacity.fair = fair
    router.engine.capacity.gate(MODEL).fair = fair


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="inferplane-routing-bench-"))
    catalog = catalog_with({MODEL: {"concurrency_per_replica": args.slots, "max_queue": 4 * args.workers,
                                    "queue_timeout_s": 120}})
    store = MeteringStore(f"sqlite:///{tmp / 'metering.db'}", b"routing-bench-secret-0123456789abc")
    store.migrate()
    metering = build_server(MeteringSettings(server=ServerSettings(port=0, grace_seconds=0),
                                             database_url=f"sqlite:///{tmp / 'metering.db'}",
                                             secret_file=tmp / "secret", catalog=catalog), store=store)
    await metering.start()
    executor = Executor(ExecutorSettings(
        server=ServerSettings(port=0, grace_seconds=1), catalog=CATALOG,
        triton=TritonSettings(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                              work_dir=tmp / "executor", exit_timeout_s=1, ready_timeout_s=180)))
    progress("starting Triton ...")
    await executor.start()
    router = Router(RouterSettings(server=ServerSettings(port=0, grace_seconds=0),
                                   metering_addr=f"127.0.0.1:{metering.port}", catalog=catalog,
                                   executor_addrs=[f"127.0.0.1:{executor.server.port}"], outbox_path=tmp / "outbox.db",
                                   request_timeout_s=120, catalog_poll_s=0))
    await router.start()
    _, flood_key = store.create_key("flood", tenant_id="flood")
    _, quiet_key = store.create_key("quiet", tenant_id="quiet")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.server.port}")
    stub = router_pb2_grpc.RouterServiceStub(channel)
    try:
        while router.engine.executors.serving_count(MODEL) == 0:  # noqa: ASYNC110  (a condition to poll)
            await asyncio.sleep(0.2)
        await phase(stub, [("warm", flood_key, "default", 2)], 2, args.max_tokens)
        half = args.workers // 2
        progress("phase 1: flex and priority at saturation ...")
        gate = router.engine.capacity.gate(MODEL)
        gate.max_queue = args.tier_queue  # smaller than the streams waiting: the queue fills, flex is shed
        tiers = await phase(stub, [("flex", flood_key, "flex", half), ("priority", quiet_key, "priority", half)],
                            args.seconds, args.max_tokens)
        gate.max_queue = 4 * args.workers  # room for every stream: the order decides, nothing is refused
        figures: dict[bool, dict[str, Tally]] = {True: {}, False: {}}
        for n, fair in enumerate((True, False, False, True)):  # ABBA: drift of the shared machine cancels out
            set_fair(router, fair)
            progress(f"phase {n + 2}: one tenant floods, another trickles, fair queue {'on' if fair else 'off'} ...")
            got = await phase(stub, [("flood", flood_key, "default", args.workers)], args.seconds, args.max_tokens,
                              trickle_key=quiet_key, every_s=args.trickle_every_s)
            for name, tally in got.items():
                total = figures[fair].setdefault(name, Tally())
                total.ttft += tally.ttft
                total.tokens += tally.tokens
    finally:
        await channel.close(None)
        await router.stop(0)
        await executor.stop(0)
        await metering.stop(0)

    print(f"\ntiny-llama, {args.slots} slots, {args.workers} closed-loop streams, {args.max_tokens} tokens each, "
          f"{args.seconds:.0f} s per phase (one run, this machine); tiers: a queue of {args.tier_queue}")
    f, p = tiers["flex"], tiers["priority"]
    print(f"tiers:    priority TTFT p50 {p.p(50) * 1000:7.1f} ms  p90 {p.p(90) * 1000:7.1f} ms  "
          f"({len(p.ttft)} requests, {p.refused} refused)")
    print(f"          flex     TTFT p50 {f.p(50) * 1000:7.1f} ms  p90 {f.p(90) * 1000:7.1f} ms  "
          f"({len(f.ttft)} requests, {f.refused} shed with 429)")
    print(f"          priority p50 / flex p50 = {p.p(50) / f.p(50):.3f}")
    for fair in (True, False):
        q, fl = figures[fair]["quiet"], figures[fair]["flood"]
        print(f"fair {'on ' if fair else 'off'}: quiet tenant TTFT p50 {q.p(50) * 1000:7.1f} ms "
              f"({len(q.ttft)} requests); flooding tenant {fl.tokens / (2 * args.seconds):7.1f} tokens/s")
    on, off = figures[True], figures[False]
    print(f"          quiet TTFT p50 off / on = {off['quiet'].p(50) / on['quiet'].p(50):.2f}x; "
          f"flooding tenant tokens/s on / off = {on['flood'].tokens / max(1, off['flood'].tokens):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--workers", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--trickle-every-s", type=float, default=0.5)
    parser.add_argument("--tier-queue", type=int, default=12, help="the model's max_queue in the tiers phase")
    asyncio.run(main(parser.parse_args()))
