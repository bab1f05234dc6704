import random

import pytest

from inferplane.router.replicas import Replica, RetryBudget, choose


def replica(name: str, outstanding: int = 0, reported: int = 0) -> Replica:
    return Replica(name, None, None, serving=True, outstanding=outstanding, reported_active=reported)  # type: ignore[arg-type]


def test_retry_budget_keeps_attempts_within_1_2x_when_half_fail():
    budget = RetryBudget(ratio=0.2, burst=10)
    rng = random.Random(1)
    requests, attempts = 10_000, 0
    for _ in range(requests):
        budget.on_request()
        attempts += 1
        if rng.random() < 0.5 and budget.try_spend():  # half the first attempts fail: retry if allowed
            attempts += 1
    assert attempts <= 1.2 * requests + 10  # + the burst
    assert attempts > 1.15 * requests  # the budget is used, not starved


def test_power_of_two_choices_prefers_the_less_loaded():
    rng = random.Random(0)
    busy, idle = replica("busy", outstanding=5), replica("idle", reported=1)
    picks = [choose([busy, idle], rng).address for _ in range(50)]
    assert set(picks) == {"idle"}


def test_power_of_two_choices_spreads_equal_load():
    rng = random.Random(0)
    pool = [replica(f"r{i}") for i in range(4)]
    counts = {r.address: 0 for r in pool}
    for _ in range(4000):
        r = choose(pool, rng)
        counts[r.address] += 1
        r.outstanding += 1  # the chosen one gets busier
    assert max(counts.values()) - min(counts.values()) <= 2


@pytest.mark.parametrize(("failures", "expected"), [(1, 1.0), (2, 2.0), (3, 4.0), (10, 30.0)])
def test_ejection_backs_off_exponentially(failures: int, expected: float):
    r = replica("x")
    for _ in range(failures):
        backoff = r.eject(100.0, 1.0, 30.0)
    assert backoff == expected and not r.available(100.0 + expected - 0.01) and r.available(100.0 + expected)
