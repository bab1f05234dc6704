"""GCRA rate limiting in one process: bursts, refill, both dimensions at once, OpenAI's headers."""

from __future__ import annotations

import pytest

from inferplane.router.ratelimit import Decision, Limits, LocalRateLimiter, format_reset


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def limiter(clock: Clock) -> LocalRateLimiter:
    return LocalRateLimiter(clock=clock)


def admitted(rl: LocalRateLimiter, n: int, limits: Limits, *, tokens: int = 0, key: str = "k") -> int:
    return sum(rl.check_now(key, requests=1, tokens=tokens, limits=limits).allowed for _ in range(n))


def test_a_full_burst_then_refusal_then_smooth_refill(clock: Clock) -> None:
    rl = limiter(clock)
    limits = Limits(requests_per_minute=60)
    assert admitted(rl, 100, limits) == 60
    refused = rl.check_now("k", requests=1, tokens=0, limits=limits)
    assert not refused.allowed and refused.exceeded == "requests"
    assert refused.remaining_requests == 0 and refused.retry_after_s == pytest.approx(1.0)
    clock.now += 0.5
    assert admitted(rl, 5, limits) == 0  # half an interval: not yet
    clock.now += 0.5
    assert admitted(rl, 5, limits) == 1  # one interval (60 s / 60): one more
    clock.now += 60
    assert admitted(rl, 100, limits) == 60  # idle for a minute: a full burst again


def test_keys_are_independent(clock: Clock) -> None:
    rl = limiter(clock)
    limits = Limits(requests_per_minute=2)
    assert admitted(rl, 5, limits, key="a") == 2
    assert admitted(rl, 5, limits, key="b") == 2


def test_tokens_per_minute_counts_tokens(clock: Clock) -> None:
    rl = limiter(clock)
    limits = Limits(tokens_per_minute=1000)
    assert admitted(rl, 10, limits, tokens=300) == 3
    d = rl.check_now("k", requests=1, tokens=300, limits=limits)
    assert not d.allowed and d.exceeded == "tokens" and d.remaining_tokens == 100
    assert d.retry_after_s == pytest.approx(200 * 60 / 1000)  # 200 more tokens of refill: 12 s
    assert rl.check_now("k", requests=1, tokens=100, limits=limits).allowed  # a smaller one fits now


def test_a_request_larger_than_the_limit_can_never_pass(clock: Clock) -> None:
    rl = limiter(clock)
    d = rl.check_now("k", requests=1, tokens=5000, limits=Limits(tokens_per_minute=1000))
    assert not d.allowed and d.retry_after_s is None
    assert not any(k == "retry-after" for k, _ in d.headers())


def test_a_refusal_on_one_dimension_consumes_neither(clock: Clock) -> None:
    rl = limiter(clock)
    limits = Limits(requests_per_minute=10, tokens_per_minute=100)
    assert rl.check_now("k", requests=1, tokens=100, limits=limits).allowed
    refused = rl.check_now("k", requests=1, tokens=50, limits=limits)  # tokens refuse ...
    assert not refused.allowed and refused.remaining_requests == 9  # ... and the request was not counted
    assert admitted(rl, 20, limits, tokens=0) == 9


def test_unlimited_keys_are_always_allowed(clock: Clock) -> None:
    rl = limiter(clock)
    d = rl.check_now("k", requests=1, tokens=10**9, limits=Limits())
    assert d.allowed and d.headers() == ()


def test_headers_on_success_and_refusal(clock: Clock) -> None:
    rl = limiter(clock)
    limits = Limits(requests_per_minute=2, tokens_per_minute=1000)
    ok = dict(rl.check_now("k", requests=1, tokens=400, limits=limits).headers())
    assert ok == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1",
                  "x-ratelimit-reset-requests": "30s", "x-ratelimit-limit-tokens": "1000",
                  "x-ratelimit-remaining-tokens": "600", "x-ratelimit-reset-tokens": "24s"}
    rl.check_now("k", requests=1, tokens=0, limits=limits)
    no = dict(rl.check_now("k", requests=1, tokens=0, limits=limits).headers())
    assert no["retry-after"] == "30" and no["retry-after-ms"] == "30000"
    assert no["x-ratelimit-remaining-requests"] == "0" and no["x-ratelimit-reset-requests"] == "1m0s"


@pytest.mark.parametrize(("seconds", "text"), [(0, "0ms"), (0.0004, "1ms"), (0.12, "120ms"), (1, "1s"),
                                               (1.5, "1.5s"), (59.999, "59.999s"), (60, "1m0s"),
                                               (361.25, "6m1.25s")])
def test_format_reset(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_idle_keys_are_forgotten_beyond_the_bound(clock: Clock) -> None:
    rl = LocalRateLimiter(max_keys=3, clock=clock)
    for key in "abcde":
        rl.check_now(key, requests=1, tokens=0, limits=Limits(requests_per_minute=1))
    assert len(rl._state) == 3


def test_decision_defaults_allow() -> None:
    assert Decision(True).headers() == ()


def test_a_negative_cost_gives_back_but_never_beyond_a_full_bucket(clock: Clock) -> None:
    rl = limiter(clock)
    limits = Limits(tokens_per_minute=100)
    assert rl.check_now("k", requests=0, tokens=70, limits=limits).remaining_tokens == 30
    back = rl.check_now("k", requests=0, tokens=-30, limits=limits)  # a fallback counting 40 instead of 70
    assert back.allowed and back.remaining_tokens == 60
    clock.now += 60.0  # a full refill: the bucket is full; giving back more leaves it full, not fuller
    full = rl.check_now("k", requests=0, tokens=-40, limits=limits)
    assert full.allowed and full.remaining_tokens == 100 and full.reset_tokens_s == 0.0
    assert admitted(rl, 1, limits, tokens=100) == 1 and admitted(rl, 1, limits, tokens=1) == 0
