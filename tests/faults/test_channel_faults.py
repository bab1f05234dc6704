"""The executor channel under a replica that dies: the sequences it holds that have no token yet are retried on
the other replica (nothing reached their callers), and the channel's heartbeats keep a slow executor's channel
open meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from inferplane.cli.launcher import LocalStack
from tests.faults.test_faults import scrape, stream_one, triton_pid

pytestmark = pytest.mark.faults


async def test_sequences_without_a_token_on_a_killed_executor_are_retried_elsewhere(stack2: LocalStack) -> None:
    router_metrics = stack2.metrics_url("router")
    before = scrape(router_metrics)
    victim = stack2.procs["executor_2"]
    triton = triton_pid(stack2, "executor_2")
    os.kill(triton, signal.SIGSTOP)  # its model makes no progress; the executor itself still heartbeats
    try:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as http:
            tasks = [asyncio.create_task(stream_one(http, stack2, max_tokens=20)) for _ in range(16)]
            await asyncio.sleep(3.0)  # longer than the heartbeat: the stopped model's channel is not "silent"
            assert scrape(router_metrics).get("inferplane_router_channel_breaks_total", 0) == \
                before.get("inferplane_router_channel_breaks_total", 0)
            os.killpg(victim.pid, signal.SIGKILL)  # the replica dies with sequences that have no token yet
            os.kill(triton, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        victim.wait(10)
    assert all(r["status"] == 200 and r["done"] and r["error"] is None for r in results), results
    after = scrape(router_metrics)

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew("inferplane_router_retries_total") >= 1, "no sequence was on the killed replica: nothing was tested"
    assert grew("inferplane_router_channel_breaks_total") == 1
