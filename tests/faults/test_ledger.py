"""The ledger under load and faults: what clients observed is exactly what was recorded, once.

A stack of its own (one executor, two routers behind the same metering):
- 1,000 mixed streamed / non-streamed requests over four keys, 10 % disconnected by the client mid-stream:
  per request and per key the ledger's tokens and cost equal what the client was told (a disconnected request:
  at least the tokens it received, at most max_tokens, priced exactly); one record per request, none extra;
- the same request id sent 3 times to 2 routers leaves one record;
- metering SIGKILLed for 30 s under load: inference goes on, and after metering restarts the ledger is complete
  (every request once, 0 lost, 0 doubled).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from inferplane.cli.launcher import LocalStack, StackConfig, free_port, grpc_serving
from inferplane.common.money import PriceNanos, usd_to_nanos
from inferplane.metering.main import MeteringSettings, open_store
from inferplane.metering.store import MeteringStore, UsageRow
from inferplane.v1 import router_pb2, router_pb2_grpc
from tests.faults.test_faults import scrape

pytestmark = pytest.mark.faults
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def ledger_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    state = tmp_path_factory.mktemp("ledger")
    cfg = StackConfig(state_dir=state, ports=dict.fromkeys(StackConfig().ports, 0), ready_timeout_s=300,
                      trace_exporter="none", restart=None)  # metering stays down for 30 s when killed
    local = LocalStack(cfg, log=lambda m: None)
    try:
        local.start()
    except Exception:
        local.stop()
        raise
    yield local
    local.stop()


@pytest.fixture(scope="module")
def store(ledger_stack: LocalStack) -> Iterator[MeteringStore]:
    s = open_store(MeteringSettings(**ledger_stack.settings["metering"]))
    yield s
    s.close()


@pytest.fixture(scope="module")
def second_router(ledger_stack: LocalStack) -> Iterator[str]:
    """Another router process on the same settings (own port, own outbox), as a second replica would be."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "INFERPLANE_ROUTER_SERVER__PORT": str(port),
           "INFERPLANE_ROUTER_SERVER__METRICS_PORT": str(free_port()),
           "INFERPLANE_ROUTER_OUTBOX_PATH": str(ledger_stack.state / "router-2-outbox.db")}
    log = (ledger_stack.state / "logs" / "router_2.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "inferplane.cli", "serve", "router", "--config",
                             str(ledger_stack.settings_file)], cwd=ledger_stack.state, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    addr = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not grpc_serving(addr):
        assert proc.poll() is None and time.monotonic() < deadline, "second router did not start"
        time.sleep(0.2)
    yield addr
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@dataclass
class Seen:
    """What one client observed."""

    request_id: str
    key_id: str
    status: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_nanos: int | None = None
    received_chunks: int = 0  # content chunks (each at least one token)
    disconnected: bool = False
    max_tokens: int = 0


def usage_of(seen: Seen, usage: dict) -> None:
    seen.prompt_tokens, seen.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
    seen.cost_nanos = usd_to_nanos(usage["cost"])


async def one(http: httpx.AsyncClient, stack: LocalStack, plain: str, key_id: str, *, stream: bool,
              disconnect: bool, max_tokens: int, prompt: str) -> Seen:
    seen = Seen(uuid.uuid4().hex, key_id, disconnected=disconnect, max_tokens=max_tokens)
    headers = {"Authorization": f"Bearer {plain}", "x-request-id": seen.request_id}
    body: dict = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                  "temperature": 0.7, "seed": random.randrange(1 << 30)}
    if not stream:
        r = await http.post(f"{stack.base_url}/chat/completions", json=body, headers=headers)
        seen.status = r.status_code
        if r.status_code == 200:
            usage_of(seen, r.json()["usage"])
            assert usd_to_nanos(r.headers["x-inferplane-cost"]) == seen.cost_nanos
        return seen
    body.update(stream=True, stream_options={"include_usage": True})
    async with http.stream("POST", f"{stack.base_url}/chat/completions", json=body, headers=headers) as r:
        seen.status = r.status_code
        if r.status_code != 200:
            return seen
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage_of(seen, chunk["usage"])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                seen.received_chunks += 1
                if disconnect and seen.received_chunks == 3:
                    break  # leaving the block closes the connection mid-stream
    return seen


def ledger(store: MeteringStore, key_ids: list[str]) -> dict[str, UsageRow]:
    rows: dict[str, UsageRow] = {}
    for key_id in key_ids:
        page = store.list_usage(key_id, limit=1000)  # metering's largest page
        assert len(page) < 1000, f"{key_id}: 1,000 records or more, one page cannot list them all: use more keys"
        for row in page:
            assert row.request_id not in rows, f"two records for {row.request_id}"
            rows[row.request_id] = row
    return rows


async def wait_for_records(store: MeteringStore, key_ids: list[str], n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(store.count_usage(k) for k in key_ids) < n:
        assert time.monotonic() < deadline, f"only {sum(store.count_usage(k) for k in key_ids)} of {n} records"
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)  # and nothing more arrives after


SERVICE_LOGS = ("gateway", "router", "tokenizer", "executor", "metering")


def logged_errors(stack: LocalStack) -> list[str]:
    """Error records and tracebacks in the services' logs (clients leaving mid-stream are not errors)."""
    found = []
    for name in (n for n in SERVICE_LOGS if n in stack.start_order):  # the tokenizer runs only when used
        for line in (stack.state / "logs" / f"{name}.log").read_text(errors="replace").splitlines():
            try:
                level = json.loads(line).get("level", "")
            except ValueError:
                level = ""
            if level in ("error", "critical") or "Traceback" in line:
                found.append(f"{name}: {line[:300]}")
    return found


def price(store: MeteringStore) -> PriceNanos:
    info = store.current_price(MODEL)
    assert info is not None
    return info.price


async def test_1000_mixed_requests_with_disconnects_reconcile_exactly(ledger_stack: LocalStack,
                                                                      store: MeteringStore) -> None:
    keys = [store.create_key(f"tenant-{i % 2}-key-{i}", tenant_id=f"tenant-{i % 2}") for i in range(4)]
    store.set_budget("key", keys[0][0].key_id, usd_to_nanos("1000"))  # one key goes through reservations too
    rng = random.Random(7)
    plan = []
    for i in range(1000):
        disconnect = i % 10 == 3  # 10 %, streamed and cut after three chunks
        plan.append((keys[i % 4], disconnect or i % 2 == 0, disconnect, 48 if disconnect else rng.randint(2, 16),
                     rng.choice(["Hi", "What is a list?", "Tell me about dict", "Return the value"])))
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(timeout=120) as http:
        async def run(p: tuple) -> Seen:
            (info, plain), stream, disconnect, max_tokens, prompt = p
            async with sem:
                return await one(http, ledger_stack, plain, info.key_id, stream=stream, disconnect=disconnect,
                                 max_tokens=max_tokens, prompt=prompt)

        seen = await asyncio.gather(*(run(p) for p in plan))
    assert {s.status for s in seen} == {200}
    key_ids = [k.key_id for k, _ in keys]
    await wait_for_records(store, key_ids, len(seen))
    rows = ledger(store, key_ids)
    assert set(rows) == {s.request_id for s in seen}  # 0 lost, 0 extra (and ledger() found 0 duplicates)
    p = price(store)
    cut = 0
    for s in seen:
        row = rows[s.request_id]
        assert row.key_id == s.key_id
        assert row.cost_nanos == p.cost(row.prompt_tokens, row.completion_tokens, row.cached_tokens)
        if s.disconnected:
            # billed for what was generated: at least what reached the client, never more than asked for
            assert s.received_chunks <= row.completion_tokens <= s.max_tokens, (s, row)
            cut += row.cancelled
        else:
            assert (row.prompt_tokens, row.completion_tokens, row.cost_nanos) == (
                s.prompt_tokens, s.completion_tokens, s.cost_nanos), (s, row)
    print(f"\nledger: {len(seen)} requests, {len(rows)} records, {sum(s.disconnected for s in seen)} disconnected "
          f"({cut} billed as cancelled), completion tokens {sum(r.completion_tokens for r in rows.values())}")
    assert cut >= 50  # most of the 100 disconnects reached the router before their generation ended
    for key_id in key_ids:  # and per key, the sums agree
        mine = [s for s in seen if s.key_id == key_id and not s.disconnected]
        theirs = [rows[s.request_id] for s in mine]
        assert sum(r.completion_tokens for r in theirs) == sum(s.completion_tokens or 0 for s in mine)
        assert sum(r.cost_nanos or 0 for r in theirs) == sum(s.cost_nanos or 0 for s in mine)
    budget = {b.subject_id: b for b in store.list_budgets("key")}[key_ids[0]]
    assert budget.spent_nanos == sum(rows[s.request_id].cost_nanos or 0 for s in seen if s.key_id == key_ids[0])
    assert budget.reserved_nanos == 0  # every reservation settled by its record
    assert not logged_errors(ledger_stack)  # e.g. no "unhandled error" from two closes of one cut stream


async def test_one_request_id_three_times_on_two_routers_is_one_record(ledger_stack: LocalStack,
                                                                      store: MeteringStore,
                                                                      second_router: str) -> None:
    info, plain = store.create_key("retrying-client")
    request_id = f"retry-{uuid.uuid4().hex}"
    routers = [f"127.0.0.1:{ledger_stack.ports['router']}"] * 2 + [second_router]

    async def send(addr: str) -> int:
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            call = stub.Generate(router_pb2.GenerateRequest(model=MODEL, prompt="Return the", max_tokens=8),
                                 metadata=(("authorization", f"Bearer {plain}"), ("x-request-id", request_id)),
                                 timeout=60)
            tokens = 0
            async for msg in call:
                tokens += msg.token_count
            return tokens

    results = await asyncio.gather(*(send(a) for a in routers))
    assert all(t > 0 for t in results)
    await wait_for_records(store, [info.key_id], 1)
    await asyncio.sleep(2.0)  # both outboxes have had time to deliver their copies
    assert [r.request_id for r in store.list_usage(info.key_id)] == [request_id]


async def test_metering_killed_for_30s_under_load_loses_nothing(ledger_stack: LocalStack,
                                                                store: MeteringStore) -> None:
    # enough keys that each holds well under one page of records (six workers for 36 s: a few thousand requests)
    keys = [store.create_key(f"outage-{i}") for i in range(12)]
    seen: list[Seen] = []
    stop = asyncio.Event()

    async with httpx.AsyncClient(timeout=120) as http:
        async def worker(w: int) -> None:
            while not stop.is_set():
                info, plain = keys[len(seen) % len(keys)]
                seen.append(await one(http, ledger_stack, plain, info.key_id, stream=w % 2 == 0, disconnect=False,
                                      max_tokens=8, prompt="Return the"))

        workers = [asyncio.ensure_future(worker(w)) for w in range(6)]
        await asyncio.sleep(3.0)  # every key verified (and cached) while metering is up
        proc = ledger_stack.procs["metering"]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at, during_before = time.monotonic(), len(seen)
        await asyncio.sleep(30.0)
        served_while_down = len(seen) - during_before
        await asyncio.to_thread(ledger_stack.spawn, "metering")
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.gather(*workers)
    assert time.monotonic() - killed_at >= 30
    assert {s.status for s in seen} == {200}, sorted({s.status for s in seen})
    assert served_while_down > 0  # inference went on without metering
    key_ids = [k.key_id for k, _ in keys]
    await wait_for_records(store, key_ids, len(seen), timeout=90)
    rows = ledger(store, key_ids)
    assert set(rows) == {s.request_id for s in seen}  # 0 lost, 0 doubled
    for s in seen:
        row = rows[s.request_id]
        assert (row.prompt_tokens, row.completion_tokens, row.cost_nanos) == (s.prompt_tokens, s.completion_tokens,
                                                                             s.cost_nanos)
    print(f"\nmetering outage: {len(seen)} requests, {served_while_down} served while metering was down, "
          f"{len(rows)} records after restart")
    depth = scrape(ledger_stack.metrics_url("router")).get("inferplane_router_usage_outbox_depth")
    assert depth == 0


async def test_router_sigkilled_right_after_its_responses_loses_no_record(ledger_stack: LocalStack,
                                                                         store: MeteringStore) -> None:
    """A response's record is in the router's outbox when the response leaves (its WAL commit): a router SIGKILLed
    right after its last response, with metering down so nothing was delivered yet, replays them all on restart."""
    import sqlite3

    info, plain = store.create_key("router-crash")
    async with httpx.AsyncClient(timeout=120) as http:
        await one(http, ledger_stack, plain, info.key_id, stream=False, disconnect=False, max_tokens=4,
                  prompt="Return the")  # the key verified and cached while metering is up
        metering = ledger_stack.procs["metering"]
        os.killpg(metering.pid, signal.SIGKILL)
        metering.wait(timeout=10)
        sem = asyncio.Semaphore(8)

        async def request(i: int) -> Seen:
            async with sem:
                return await one(http, ledger_stack, plain, info.key_id, stream=i % 2 == 0, disconnect=False,
                                 max_tokens=8, prompt="Return the")

        seen = await asyncio.gather(*(request(i) for i in range(40)))
    router = ledger_stack.procs["router"]
    os.killpg(router.pid, signal.SIGKILL)  # right after the last response: no drain, no fsync owed
    router.wait(timeout=10)
    assert {s.status for s in seen} == {200}
    with sqlite3.connect(ledger_stack.settings["router"]["outbox_path"]) as db:
        held = {row[0] for row in db.execute("SELECT request_id FROM outbox")}
    assert {s.request_id for s in seen} <= held  # survived the crash, undelivered
    await asyncio.to_thread(ledger_stack.spawn, "metering")
    await asyncio.to_thread(ledger_stack.spawn, "router")  # replays its outbox
    await wait_for_records(store, [info.key_id], len(seen) + 1, timeout=90)
    rows = ledger(store, [info.key_id])
    assert {s.request_id for s in seen} <= set(rows) and len(rows) == len(seen) + 1
    for s in seen:
        row = rows[s.request_id]
        assert (row.prompt_tokens, row.completion_tokens, row.cost_nanos) == (s.prompt_tokens, s.completion_tokens,
                                                                             s.cost_nanos)
    print(f"\nrouter SIGKILLed after {len(seen)} responses with metering down: {len(held)} records held in its "
          f"outbox, {len(rows) - 1} in the ledger after the restart")
