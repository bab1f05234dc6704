import asyncio
import random
import time

import grpc
import pytest

from inferplane.common.errors import Unavailable
from inferplane.router.replicas import Replica, ReplicaSet, RetryBudget, choose


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


# --- ReplicaSet.open: the one retry loop (generate and embed both start their executor work through it) -----

def replica_set(*names: str, retry_burst: float = 50.0) -> ReplicaSet:
    """A replica set of SERVING replicas (no channels: ``start`` below stands in for the executor call)."""
    rs = ReplicaSet(list(names), channel_factory=lambda a: None, retry_burst=retry_burst, seed=0)  # type: ignore[arg-type,return-value]
    for name in names:
        rs.replicas[name] = replica(name)
    return rs


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="test")


class Starts:
    """``start`` for ReplicaSet.open: fails on the replicas named in ``fail`` (with ``code``), else returns the
    replica's address; records which replicas it was called on and their outstanding count at that moment."""

    def __init__(self, fail: set[str], code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.fail, self.code = fail, code
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, r: Replica) -> str:
        self.calls.append((r.address, r.outstanding))
        await asyncio.sleep(0)
        if r.address in self.fail:
            raise rpc_error(self.code)
        return r.address


async def test_a_replica_fault_before_the_first_message_is_retried_once_on_another_replica():
    rs = replica_set("a", "b")
    rs.replicas["b"].reported_active = 5  # "a" is the less loaded: power of two choices picks it first
    start = Starts(fail={"a"})
    async with rs.open("m", start) as got:
        assert got == "b" and rs.replicas["b"].outstanding == 1  # held while the block runs
    assert start.calls == [("a", 1), ("b", 1)]  # counted as outstanding during each attempt
    assert all(r.outstanding == 0 for r in rs.replicas.values())
    assert not rs.replicas["a"].available(time.monotonic())  # the faulty replica is ejected


async def test_a_failure_of_the_request_itself_is_not_retried():
    rs = replica_set("a", "b")
    start = Starts(fail={"a", "b"}, code=grpc.StatusCode.DEADLINE_EXCEEDED)  # a hung replica: 504, not a retry
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with rs.open("m", start):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and len(start.calls) == 1
    assert all(r.outstanding == 0 and r.available(time.monotonic()) for r in rs.replicas.values())


async def test_retries_stop_at_one_and_at_the_budget():
    rs = replica_set("a", "b", "c")
    with pytest.raises(Unavailable):  # two faults: the second is not retried although "c" is there
        async with rs.open("m", Starts(fail={"a", "b", "c"})):
            pass
    assert sum(r.failures for r in rs.replicas.values()) == 2
    dry = replica_set("a", "b", retry_burst=0.0)  # an empty budget: the first fault is the answer
    dry.budget.tokens = 0.0
    dry.budget.ratio = 0.0
    start = Starts(fail={"a", "b"})
    with pytest.raises(Unavailable):
        async with dry.open("m", start):
            pass
    assert len(start.calls) == 1
    assert all(r.outstanding == 0 for r in [*rs.replicas.values(), *dry.replicas.values()])


async def test_the_outstanding_count_is_given_back_when_the_block_fails_or_is_cancelled():
    rs = replica_set("a")
    with pytest.raises(RuntimeError):
        async with rs.open("m", Starts(fail=set())):
            raise RuntimeError("the stream broke mid-way")
    assert rs.replicas["a"].outstanding == 0
    entered = asyncio.Event()

    async def hold() -> None:
        async with rs.open("m", Starts(fail=set())):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold())
    await entered.wait()
    assert rs.replicas["a"].outstanding == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert rs.replicas["a"].outstanding == 0


async def test_no_serving_replica_is_unavailable_before_any_call():
    rs = replica_set("a")
    rs.replicas["a"].serving = False  # draining: its health stream said NOT_SERVING
    start = Starts(fail=set())
    with pytest.raises(Unavailable):
        async with rs.open("m", start):
            pass
    assert start.calls == []


async def test_an_ejected_replica_is_back_as_soon_as_its_health_says_serving_again():
    """A restarted executor (health down, then SERVING) is not kept out for the backoff its predecessor earned."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    address = f"127.0.0.1:{port}"
    rs = ReplicaSet([address], channel_factory=grpc.aio.insecure_channel, eject_base_s=30.0, eject_max_s=30.0)
    await rs.start()
    try:
        r = rs.replicas[address]
        assert await rs.wait_any_serving(timeout=30)
        for _ in range(6):  # 32 streams failing at once on a SIGKILLed executor
            rs.failed(r, rpc_error(grpc.StatusCode.UNAVAILABLE))
        assert not r.available(time.monotonic())
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await _until(lambda: not r.serving)
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await _until(lambda: r.serving)
        assert r.available(time.monotonic()) and r.failures == 0
    finally:
        await rs.close()
        await server.stop(None)


async def _until(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
