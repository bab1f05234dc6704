"""The router's fair queue (VTC): within a tier, the waiting request of the tenant served the fewest tokens goes
first, so one tenant's flood does not starve another's trickle. Asserted on order (how many of the flood's
requests go in between a trickle request's arrival and its own turn), never on times; the same load with the fair
queue off shows the trickle waiting behind the whole flood."""

from __future__ import annotations

import asyncio

from inferplane.common import wire
from inferplane.router.capacity import ModelGate


async def steps(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def flood_and_trickle(*, fair: bool, rounds: int = 60) -> tuple[list[int], int]:
    """A model with 2 slots; tenant "flood" keeps 40 requests waiting, tenant "trickle" sends one request every 6
    completions. Each request served counts 10 prompt and 30 completion tokens. Returns, for each trickle request,
    how many requests went in between its arrival and its own turn, and how many flood requests were served."""
    g = ModelGate("m", lambda: 2, max_queue=100, queue_timeout_s=60, fair=fair)
    granted: list[str] = []
    waits: list[int] = []
    flood_served = 0

    async def request(tenant: str) -> None:
        arrived = len(granted)
        await g.acquire(60.0, tenant=tenant, tokens=10)
        granted.append(tenant)
        if tenant == "trickle":
            waits.append(len(granted) - 1 - arrived)

    for _ in range(2):  # the flood holds both slots
        await g.acquire(1.0, tenant="flood", tokens=10)
    tasks = [asyncio.ensure_future(request("flood")) for _ in range(40)]
    await steps()
    for i in range(rounds):
        if i % 6 == 3:
            tasks.append(asyncio.ensure_future(request("trickle")))
            await steps()
        # one running request ends: it produced its completion tokens, then gives its slot back
        g.served("flood" if not granted or granted[-1] == "flood" else "trickle", 30)
        g.release()
        await steps()
        if granted and granted[-1] == "flood":
            flood_served += 1
            tasks.append(asyncio.ensure_future(request("flood")))  # the flood never lets up
            await steps()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return waits, flood_served


async def test_a_trickling_tenant_goes_ahead_of_a_flooding_one() -> None:
    fair_waits, fair_flood = await flood_and_trickle(fair=True)
    fifo_waits, fifo_flood = await flood_and_trickle(fair=False)
    print(f"\nrequests let in before each trickle request: fair {fair_waits}, FIFO {fifo_waits}")
    # fair: each trickle request is the next one let in (its tenant has been served far less)
    assert fair_waits and all(w == 0 for w in fair_waits), fair_waits
    # FIFO: the trickle waits behind the 40 flood requests queued before it
    assert fifo_waits and min(fifo_waits) >= 39, fifo_waits
    # the flood is barely slowed: one slot in six goes to the trickle either way (FIFO serves them later)
    assert fair_flood >= 0.8 * fifo_flood


async def test_served_tokens_decide_between_waiting_tenants_and_idle_time_is_no_credit() -> None:
    g = ModelGate("m", lambda: 1, max_queue=10, queue_timeout_s=60)
    await g.acquire(1.0, tenant="a", tokens=5)
    order: list[str] = []

    async def request(tenant: str, tokens: int) -> None:
        await g.acquire(60.0, tenant=tenant, tokens=tokens)
        order.append(tenant)

    a = [asyncio.ensure_future(request("a", 100)) for _ in range(2)]
    await steps()
    g.served("a", 500)  # a's running request produced 500 tokens
    b = asyncio.ensure_future(request("b", 100))  # b starts waiting: lifted to the least waiting count (a's, 500)
    await steps()
    assert g.counts["b"] == g.counts["a"] == 500
    g.release()  # a tie at 500: arrival order, a first; a's count grows by its prompt tokens
    await steps()
    assert order == ["a"]
    g.release()  # now b (500) is below a (600)
    await steps()
    assert order == ["a", "b"]
    g.release()
    await steps()
    await asyncio.gather(*a, b)
    assert order == ["a", "b", "a"]
    assert g.counts == {}  # nothing waits: the counts are dropped


async def test_tiers_come_before_fairness() -> None:
    g = ModelGate("m", lambda: 1, max_queue=10, queue_timeout_s=60)
    await g.acquire(1.0, tenant="big")
    g.served("big", 0)
    order: list[str] = []

    async def request(name: str, tenant: str, tier: str) -> None:
        await g.acquire(60.0, tenant=tenant, tier=tier, tokens=1000 if tenant == "big" else 1)
        order.append(name)

    tasks = [asyncio.ensure_future(request("small-flex", "small", wire.FLEX_TIER))]
    await steps()
    tasks.append(asyncio.ensure_future(request("big-priority", "big", wire.PRIORITY_TIER)))
    await steps()
    for _ in range(2):
        g.release()
        await steps()
    await asyncio.gather(*tasks)
    assert order == ["big-priority", "small-flex"]
