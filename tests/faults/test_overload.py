"""Load shedding: a model's bounded queue answers 503 + retry-after at once beyond it, and loses nothing.

A stack of its own (one executor) with a catalog whose tiny-llama runs 4 requests at a time and lets 4 wait:
24 streams at once must leave at most 8 in the mesh, refuse the rest fast in OpenAI's shape, bill only what ran,
and leave no slot, waiter or reservation behind.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from inferplane.assets import CATALOG
from inferplane.cli.launcher import LocalStack, StackConfig
from tests.faults.test_faults import body, headers, scrape

pytestmark = pytest.mark.faults
MODEL = "tiny-llama"
RUNNING, QUEUE = 4, 4


def small_catalog(path: Path) -> Path:
    """The packaged catalog with absolute paths and a small queue for tiny-llama."""
    src = CATALOG
    data = yaml.safe_load(src.read_text())
    for model in data["models"]:
        for field in ("checkpoint", "tokenizer"):
            value = str(model.get(field, ""))
            if value and not value.startswith("package:"):
                model[field] = str((src.parent / value).resolve())
        if model["id"] == MODEL:
            model.update(concurrency_per_replica=RUNNING, max_queue=QUEUE, queue_timeout_s=2.0)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    state = tmp_path_factory.mktemp("overload")
    cfg = StackConfig(state_dir=state, catalog=small_catalog(state / "catalog.yaml"),
                      ports=dict.fromkeys(StackConfig().ports, 0), ready_timeout_s=300, trace_exporter="none")
    local = LocalStack(cfg, log=lambda m: None)
    try:
        local.start()
    except Exception:
        local.stop()
        raise
    local.api_key = local.create_demo_key()  # type: ignore[attr-defined]
    yield local
    local.stop()


async def timed(http: httpx.AsyncClient, stack: LocalStack, max_tokens: int) -> dict:
    started = time.monotonic()
    out: dict = {"status": None, "headers": {}, "error": None, "tokens": 0}
    async with http.stream("POST", f"{stack.base_url}/completions", headers=headers(stack),
                           json={**body(max_tokens), "stream_options": {"include_usage": True}}) as r:
        out["status"], out["headers"] = r.status_code, dict(r.headers)
        if r.status_code != 200:
            out["error"] = json.loads(await r.aread())["error"]
        else:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        out["tokens"] = usage["completion_tokens"]
    out["done_s"] = time.monotonic() - started
    return out


def usage_requests(stack: LocalStack) -> int:
    r = httpx.get(f"{stack.base_url}/usage", headers=headers(stack), timeout=10)
    r.raise_for_status()
    return sum(row["requests"] for row in r.json()["data"] if row["model"] == MODEL)


async def test_beyond_the_queue_requests_are_refused_fast_with_503(small: LocalStack) -> None:
    before = usage_requests(small)
    async with httpx.AsyncClient(timeout=60) as http:
        results = await asyncio.gather(*(timed(http, small, 120) for _ in range(24)))
    ok = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 503]
    assert len(ok) + len(refused) == len(results), sorted({r["status"] for r in results})
    assert len(ok) >= RUNNING
    # at most RUNNING + QUEUE were in the mesh at once; the others found the queue full
    full = [r for r in refused if "waiting" in r["error"]["message"]]
    assert len(full) >= len(results) - RUNNING - QUEUE
    for r in refused:
        assert r["error"]["code"] == "overloaded" and r["error"]["type"] == "server_error"
        assert int(r["headers"]["retry-after"]) >= 1
    # "answered fast": each queue-full refusal came back before the first admitted stream was done
    assert max(r["done_s"] for r in full) < min(r["done_s"] for r in ok)
    assert all(r["tokens"] > 0 for r in ok)

    # nothing left behind in the router: no slot held, nobody waiting; refusals counted
    deadline = time.monotonic() + 10
    while True:
        m = scrape(small.metrics_url("router"))
        if m.get("inferplane_router_model_running", -1) == 0 and m.get("inferplane_router_model_queued", -1) == 0:
            break
        assert time.monotonic() < deadline, m
        await asyncio.sleep(0.2)
    assert m.get("inferplane_router_model_shed_total", 0) >= len(refused)
    # only what ran is billed: one usage record per admitted request, none for the refused ones
    deadline = time.monotonic() + 15
    while usage_requests(small) - before < len(ok):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.3)
    await asyncio.sleep(1.0)
    assert usage_requests(small) - before == len(ok)


async def test_after_the_burst_the_model_serves_again(small: LocalStack) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        results = await asyncio.gather(*(timed(http, small, 16) for _ in range(RUNNING)))
    assert [r["status"] for r in results] == [200] * RUNNING
