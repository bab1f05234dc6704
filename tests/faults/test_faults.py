"""Fault tests, bounded in time: replicas killed or hung mid-load, Triton killed, 1,000 disconnects, SIGTERM.

Each asserts what a user must see: no request that had not started streaming is lost, a started
stream completes or ends with an explicit error event, nothing hangs past its deadline, cancellations
reach Triton, and draining services finish in-flight streams.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inferplane.cli.launcher import LocalStack
from tests.faults.conftest import REQUEST_TIMEOUT_S

pytestmark = pytest.mark.faults
MODEL = "tiny-llama"


def headers(stack: LocalStack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}"}  # type: ignore[attr-defined]


def body(max_tokens: int = 120, stream: bool = True) -> dict:
    return {"model": MODEL, "prompt": "Return the", "max_tokens": max_tokens, "temperature": 0, "stream": stream}


async def stream_one(http: httpx.AsyncClient, stack: LocalStack, *, max_tokens: int = 120,
                     started: asyncio.Event | None = None) -> dict:
    """One streaming completion: {'status', 'chunks', 'done', 'error', 'finish'}."""
    out: dict = {"status": None, "chunks": 0, "done": False, "error": None, "finish": None}
    async with http.stream("POST", f"{stack.base_url}/completions", json=body(max_tokens), headers=headers(stack)) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            out["error"] = (await r.aread()).decode()
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                out["done"] = True
                break
            obj = json.loads(data)
            if "error" in obj:
                out["error"] = obj["error"]
                break
            out["chunks"] += 1
            if started is not None:
                started.set()
            if obj["choices"] and obj["choices"][0]["finish_reason"]:
                out["finish"] = obj["choices"][0]["finish_reason"]
    return out


def scrape(url: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
    out, frontier = [], {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier}
        out += frontier
    return out


def triton_pid(stack: LocalStack, executor: str) -> int:
    for pid in descendants(stack.procs[executor].pid):
        try:
            if Path(f"/proc/{pid}/exe").resolve().name == "tritonserver":
                return pid
        except OSError:
            continue
    raise AssertionError(f"no tritonserver under {executor}")


def serving(stack: LocalStack, name: str) -> bool:
    from inferplane.cli.launcher import grpc_serving

    return grpc_serving(f"127.0.0.1:{stack.ports[name]}")


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


async def test_sigterm_of_the_router_lets_in_flight_streams_finish(stack2: LocalStack) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        started = asyncio.Event()
        tasks = [asyncio.create_task(stream_one(http, stack2, max_tokens=60, started=started)) for _ in range(6)]
        await asyncio.wait_for(started.wait(), 30)
        os.killpg(stack2.procs["router"].pid, signal.SIGTERM)  # grace: 5 s, the streams need ~1 s
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert all(r["done"] and r["finish"] in ("stop", "length") for r in results), results
    assert stack2.procs["router"].wait(15) == 0
    stack2.spawn("router")


async def test_sigkill_one_of_two_executors_under_32_streams(stack2: LocalStack) -> None:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
        started = asyncio.Event()
        tasks = [asyncio.create_task(stream_one(http, stack2, max_tokens=150, started=started)) for _ in range(32)]
        await asyncio.wait_for(started.wait(), 30)
        await asyncio.sleep(0.3)
        victim = stack2.procs["executor_2"]
        triton = triton_pid(stack2, "executor_2")
        # The whole replica dies at once, as a pod or a machine does: executor, Triton and its model stubs.
        os.killpg(victim.pid, signal.SIGKILL)
        os.killpg(triton, signal.SIGKILL)
        late = [asyncio.create_task(stream_one(http, stack2, max_tokens=20)) for _ in range(8)]
        results = await asyncio.wait_for(asyncio.gather(*tasks, *late), REQUEST_TIMEOUT_S * 4)
    for r in results:
        assert r["status"] == 200, r  # nothing that had not started streaming was lost: it was retried
        if r["error"] is None:
            assert r["done"] and r["finish"] in ("stop", "length"), r
        else:
            assert r["chunks"] >= 1, r  # a failure after streaming started is an explicit error event
    assert all(r["done"] for r in results[32:]), results[32:]  # new requests go to the survivor
    victim.wait(10)
    stack2.spawn("executor_2")
    wait_until(lambda: serving(stack2, "executor_2"), 120, "executor_2 back")


async def test_triton_killed_under_an_executor_fails_over(stack2: LocalStack) -> None:
    os.kill(triton_pid(stack2, "executor"), signal.SIGKILL)
    async with httpx.AsyncClient(timeout=60) as http:
        results = await asyncio.wait_for(asyncio.gather(*[stream_one(http, stack2, max_tokens=10)
                                                          for _ in range(8)]), REQUEST_TIMEOUT_S * 3)
    assert all(r["status"] == 200 and r["done"] for r in results), results
    wait_until(lambda: serving(stack2, "executor"), 180, "executor serving again after Triton restarted")


async def test_hung_executors_answer_504_within_the_deadline(stack2: LocalStack) -> None:
    groups = [stack2.procs[name].pid for name in ("executor", "executor_2")]
    for group in groups:
        os.killpg(group, signal.SIGSTOP)  # the executors hang: their health streams stay open and silent
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            t0 = time.monotonic()
            rs = await asyncio.wait_for(asyncio.gather(*[
                http.post(f"{stack2.base_url}/completions", json=body(8, stream=False), headers=headers(stack2))
                for _ in range(4)]), REQUEST_TIMEOUT_S + 10)
            elapsed = time.monotonic() - t0
    finally:
        for group in groups:
            os.killpg(group, signal.SIGCONT)
    assert [r.status_code for r in rs] == [504] * 4, [r.text for r in rs]
    assert all(r.json()["error"]["code"] == "timeout" for r in rs)
    assert elapsed < REQUEST_TIMEOUT_S + 5  # answered at the router's deadline, not left hanging
    async with httpx.AsyncClient(timeout=60) as http:  # and the replicas serve again once they wake up
        ok = await stream_one(http, stack2, max_tokens=5)
    assert ok["done"], ok


async def test_1000_client_disconnects_cancel_down_to_triton(stack2: LocalStack) -> None:
    def counted(name: str) -> float:
        return sum(scrape(stack2.metrics_url(e)).get(name, 0) for e in ("executor", "executor_2"))

    def cancels() -> float:
        return counted("inferplane_executor_cancellations_total")

    def finished() -> float:
        return counted("inferplane_executor_generations_finished_total")

    before, before_finished = cancels(), finished()
    sem = asyncio.Semaphore(48)

    async def leave_after_first_chunk(http: httpx.AsyncClient) -> bool:
        async with sem, http.stream("POST", f"{stack2.base_url}/completions", json=body(300),
                                    headers=headers(stack2)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return True  # leaving closes the connection mid-stream
        return False

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
        left = await asyncio.wait_for(asyncio.gather(*[leave_after_first_chunk(http) for _ in range(1000)]), 600)
    assert sum(left) == 1000

    def drained() -> bool:
        return all(scrape(stack2.metrics_url(e)).get("inferplane_executor_active_requests", 1) == 0
                   for e in ("executor", "executor_2"))

    wait_until(drained, 60, "executors idle after the disconnects")
    # Every one reached the executor's Triton stream and ended there: cancelled, unless the executor (which runs
    # ahead of a router slowed by the load, by what the gRPC stream buffers) had already generated all 300 tokens
    # when the cancellation arrived. A CI run saw 997 + 3 that way: the router had read 2-202 tokens at the cancel.
    cancelled, ran_out = cancels() - before, finished() - before_finished
    print(f"\n1,000 disconnects: {cancelled:.0f} cancelled down to Triton, {ran_out:.0f} generated to the end first")
    assert cancelled + ran_out == 1000, (cancelled, ran_out)
    for triton in ("triton", "triton_2"):  # the model freed every slot
        def slots_free(url: str = stack2.metrics_url(triton)) -> bool:
            try:
                return scrape(url).get("inferplane_llm_kv_slots_in_use", -1) == 0
            except httpx.HTTPError:
                return False

        wait_until(slots_free, 60, f"{triton}: every KV-cache slot free")
    assert all(p.poll() is None for p in stack2.procs.values()), "a service crashed"
    async with httpx.AsyncClient(timeout=60) as http:
        ok = await stream_one(http, stack2, max_tokens=5)
    assert ok["done"]
