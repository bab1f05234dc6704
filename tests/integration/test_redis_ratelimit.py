"""Rate limits shared through a real Redis: several routers together admit the limit, not N times it.

The server is ``INFERPLANE_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``); without it the tests skip
locally and fail in CI. Every test uses its own key prefix, so runs never see each other's state.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from inferplane.common.errors import Unavailable
from inferplane.router.admission import Admission, AdmissionRefused, PriceBook
from inferplane.router.engine import GenerationInput
from inferplane.router.ratelimit import Limits, RedisRateLimiter
from tests.conftest import require
from tests.integration.test_admission import CATALOG, MODEL, Metering, metering  # noqa: F401  (the fixture)
from tests.unit.test_engine_cleanup import CHAT
from tests.unit.test_engine_fallbacks import LIMITED, fall_back_under_limits

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def redis_url() -> str:
    return os.environ.get("INFERPLANE_TEST_REDIS_URL", DEFAULT_URL)


async def redis_available() -> bool:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url(), socket_connect_timeout=2, socket_timeout=2)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'metering.db'}"  # budgets are not what these tests are about


@pytest_asyncio.fixture
async def prefix() -> AsyncIterator[str]:
    require(await redis_available(), f"Redis at {redis_url()} is not reachable")
    yield f"inferplane-test:{uuid.uuid4().hex[:8]}:"


async def test_two_routers_sharing_redis_admit_the_limit_not_twice_it(metering: Metering,  # noqa: F811
                                                                      prefix: str) -> None:
    """Limit 100/min, 1,000 requests offered at once through two routers' admissions: 100 to 102 admitted."""
    key = await metering.key(requests_per_minute=100)
    limiters = [RedisRateLimiter(redis_url(), prefix=prefix, on_error="closed", timeout_s=10) for _ in range(2)]
    routers = [Admission(metering.client, lim, PriceBook(metering.client, CATALOG)) for lim in limiters]

    async def offer(i: int) -> bool:
        try:
            await routers[i % 2].admit(key, MODEL, 10, 10)
            return True
        except AdmissionRefused as exc:
            assert dict(exc.metadata)["x-ratelimit-limit-requests"] == "100"
            return False

    started = time.monotonic()
    results = await asyncio.gather(*(offer(i) for i in range(1000)))
    took = time.monotonic() - started
    admitted_by = [sum(r for i, r in enumerate(results) if i % 2 == n) for n in (0, 1)]
    print(f"\nadmitted {sum(results)} of 1000 in {took:.2f}s (router A {admitted_by[0]}, router B {admitted_by[1]})")
    # GCRA refills 100/60 per second while the test runs: 0.3 s on this machine, so 100 or 101 in practice
    refill = math.floor(took * 100 / 60)
    assert 100 <= sum(results) <= 102 + refill
    assert all(n > 0 for n in admitted_by)  # both routers took part
    for lim in limiters:
        await lim.close()


async def test_redis_decisions_match_the_local_algorithm(prefix: str) -> None:
    rl = RedisRateLimiter(redis_url(), prefix=prefix, on_error="closed", timeout_s=10)
    limits = Limits(requests_per_minute=3, tokens_per_minute=1000)
    first = await rl.check("k", requests=1, tokens=400, limits=limits)
    assert first.allowed and (first.remaining_requests, first.remaining_tokens) == (2, 600)
    assert first.reset_requests_s == pytest.approx(20, abs=0.05)
    tokens_refused = await rl.check("k", requests=1, tokens=700, limits=limits)
    assert not tokens_refused.allowed and tokens_refused.exceeded == "tokens"
    assert tokens_refused.remaining_requests == 2  # a refusal counts nothing
    assert tokens_refused.retry_after_s == pytest.approx(100 * 60 / 1000, abs=0.05)
    assert (await rl.check("k", requests=1, tokens=0, limits=limits)).allowed
    assert (await rl.check("k", requests=1, tokens=0, limits=limits)).allowed
    refused = await rl.check("k", requests=1, tokens=0, limits=limits)
    assert not refused.allowed and refused.exceeded == "requests" and dict(refused.headers())["retry-after"] == "20"
    too_big = await rl.check("other", requests=1, tokens=5000, limits=limits)
    assert not too_big.allowed and too_big.retry_after_s is None
    assert (await rl.check("other", requests=1, tokens=10, limits=Limits())).allowed
    await rl.close()


async def test_when_redis_is_down(prefix: str) -> None:
    limits = Limits(requests_per_minute=2)
    local = RedisRateLimiter("redis://127.0.0.1:1/0", on_error="local", timeout_s=0.2)
    assert [(await local.check("k", requests=1, tokens=0, limits=limits)).allowed for _ in range(3)] \
        == [True, True, False]  # each router enforces the limit by itself
    opened = RedisRateLimiter("redis://127.0.0.1:1/0", on_error="open", timeout_s=0.2)
    assert all([(await opened.check("k", requests=1, tokens=0, limits=limits)).allowed for _ in range(3)])
    closed = RedisRateLimiter("redis://127.0.0.1:1/0", on_error="closed", timeout_s=0.2)
    with pytest.raises(Unavailable):
        await closed.check("k", requests=1, tokens=0, limits=limits)
    for rl in (local, opened, closed):
        await rl.close()


async def test_a_fallback_through_redis_counts_the_request_once(prefix: str) -> None:
    """The engine's fallback (``tests/unit/test_engine_fallbacks.py``) with the limiter in Redis: the fallback's
    admission counts no second request, and gives back the tokens the primary counted beyond its own (a negative
    cost in the Lua script)."""
    limiter = RedisRateLimiter(redis_url(), prefix=prefix, on_error="closed", timeout_s=10)
    try:
        engine, _ = await fall_back_under_limits(limiter)
        # requests_per_minute 1: a second request is refused; tokens_per_minute 1000 refill 1 per 60 ms, so what
        # is left is b's 40 counted plus what time refilled, never a's 100 on top
        left = await limiter.check(LIMITED.key_id, requests=0, tokens=0,
                                   limits=Limits(LIMITED.requests_per_minute, LIMITED.tokens_per_minute))
        assert left.remaining_requests == 0
        assert left.remaining_tokens is not None and 1000 - 40 <= left.remaining_tokens < 1000 - 40 + 50
        with pytest.raises(AdmissionRefused, match="requests per minute"):
            [d async for d in engine.generate(GenerationInput(model="b", messages=CHAT), key=LIMITED,
                                              request_id="r2")]
    finally:
        await limiter.close()
