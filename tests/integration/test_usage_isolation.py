"""Key A cannot read key B's usage on any route: the gateway's REST routes and metering's gRPC reads.

Two tenants (t1: key A; t2: keys B and B2) and an admin key, each with usage of its own, on SQLite and on
PostgreSQL. A plain key reads its own usage only, whatever key or tenant it names; the admin routes refuse it
(403, OpenAI-shaped, nothing of B in the body); no key, a wrong key or a revoked key gets nothing at all. The
admin key is the positive control: it sees every key and its filters work, so the "A sees only A" assertions
are not true merely because nothing was recorded or the filters are ignored.

The last test enumerates the gateway app's routes and metering's gRPC methods: a new usage route fails it until
it is added to the tables below, which drive the isolation tests themselves.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts

from inferplane.gateway.app import create_app
from inferplane.gateway.main import GatewaySettings
from inferplane.v1 import metering_pb2, metering_pb2_grpc
from tests.integration.test_admission import Metering, database_url, metering, record  # noqa: F401  (fixtures)
from tests.openai_schema import validate

Metadata = tuple[tuple[str, str], ...]


# ---- the world: two tenants, four keys, usage for each ---------------------------------------------------

@dataclass
class World:
    a: str  # key ids
    b: str
    b2: str
    admin: str
    plain: dict[str, str]  # key id -> plain key
    requests: dict[str, set[str]]  # key id -> its usage records' request ids

    def auth(self, key_id: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.plain[key_id]}"}

    def bearer(self, key_id: str) -> Metadata:
        return (("authorization", f"Bearer {self.plain[key_id]}"),)

    @property
    def tenants(self) -> dict[str, str]:
        return {self.a: "t1", self.b: "t2", self.b2: "t2", self.admin: "default"}

    def others_of(self, key_id: str) -> set[str]:
        return set(self.plain) - {key_id}


@pytest_asyncio.fixture
async def world(metering: Metering) -> World:  # noqa: F811
    plain: dict[str, str] = {}
    ids: dict[str, str] = {}
    for name, tenant, scopes in (("a", "t1", None), ("b", "t2", None), ("b2", "t2", None),
                                 ("admin", "default", ["admin"])):
        info, plain_key = metering.store.create_key(name, tenant_id=tenant, scopes=scopes)
        ids[name], plain[info.key_id] = info.key_id, plain_key
    # A budget per key, so that /admin/budgets (spent per key: usage by another name) has B in it.
    for key_id in ids.values():
        metering.store.set_budget("key", key_id, 10**12)
    counts = {"a": 2, "b": 1, "b2": 3, "admin": 1}
    records: list[metering_pb2.UsageRecord] = []
    requests: dict[str, set[str]] = {}
    for name, n in counts.items():
        key = await metering.client.verify_key(plain[ids[name]], timeout=5)
        requests[key.key_id] = {f"{name}-{i}" for i in range(n)}
        records += [record(f"{name}-{i}", key, 100 + i, 10 + i) for i in range(n)]
    await metering.client.record_usage_batch(records)
    assert metering.store.count_usage() == sum(counts.values())
    return World(ids["a"], ids["b"], ids["b2"], ids["admin"], plain, requests)


@pytest_asyncio.fixture
async def gateway_app(metering: Metering) -> FastAPI:  # noqa: F811
    # The whole gateway app (every route it serves), its router address unused: these routes call metering only.
    return create_app(GatewaySettings(metering_addr=f"127.0.0.1:{metering.server.port}", router_addr="127.0.0.1:9"))


@pytest_asyncio.fixture
async def http(gateway_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_app.router.lifespan_context(gateway_app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway_app), base_url="http://gw") as client:
        yield client


def stub(m: Metering) -> metering_pb2_grpc.MeteringServiceStub:
    return metering_pb2_grpc.MeteringServiceStub(m.channel)


# ---- the routes under test -------------------------------------------------------------------------------

# Query strings by which a plain key might ask for someone else's usage (B and t2 filled in per test).
SNOOPS: list[dict[str, str]] = [{}, {"key_id": "{b}"}, {"tenant": "t2"}, {"key_id": "{b}", "tenant": "t2"},
                                {"key_id": "{b2}", "tenant": "t1"}]
FORMATS = ["json", "csv"]


def _params(snoop: dict[str, str], w: World, fmt: str) -> dict[str, str]:
    return {**{k: v.format(b=w.b, b2=w.b2) for k, v in snoop.items()}, "format": fmt}


def _rows(resp: httpx.Response, fmt: str) -> list[dict[str, Any]]:
    assert resp.status_code == 200, resp.text
    if fmt == "csv":
        assert resp.headers["content-type"].startswith("text/csv")
        return list(csv.DictReader(io.StringIO(resp.text)))
    body = resp.json()
    assert body["object"] == "list"
    return list(body["data"])


# REST routes any key may call: they answer the caller's own usage.
OWN_USAGE_ROUTES = {("GET", "/v1/usage")}
# REST routes that show usage across keys: admin keys only.
ADMIN_USAGE_ROUTES = {("GET", "/admin/usage")}
# Admin routes whose answers carry other keys' usage under another name (budgets: spent per key/tenant).
ADMIN_USAGE_ISH_ROUTES = {("GET", "/admin/budgets")}


def _summary_keys(resp: metering_pb2.GetUsageSummaryResponse) -> tuple[set[str], set[str], set[str]]:
    return {r.key_id for r in resp.rows}, {r.tenant_id for r in resp.rows}, set()


def _list_keys(resp: metering_pb2.ListUsageResponse) -> tuple[set[str], set[str], set[str]]:
    return {r.key_id for r in resp.records}, {r.tenant_id for r in resp.records}, {r.request_id for r in resp.records}


@dataclass(frozen=True)
class UsageRead:
    """A gRPC usage read: how to ask it (optionally naming a key and a tenant), and what the answer covers."""

    request: Callable[..., Any]
    covers: Callable[[Any], tuple[set[str], set[str], set[str]]]  # key ids, tenants, request ids (if it has them)


# Metering's gRPC usage reads: any valid key, scoped to itself unless it is an admin key.
GRPC_USAGE_READS = {
    "GetUsageSummary": UsageRead(metering_pb2.GetUsageSummaryRequest, _summary_keys),
    "ListUsage": UsageRead(lambda **kw: metering_pb2.ListUsageRequest(limit=1000, **kw), _list_keys),
}
# Metering's admin-only reads that carry other keys' usage under another name.
GRPC_ADMIN_USAGE_ISH = {"ListBudgets": metering_pb2.ListBudgetsRequest}
# The router's write calls: mesh-internal (metering's port is not public; Envoy routes only the router's gRPC
# service and the gateway's /v1 and /admin paths), and they only write usage, never read any back.
GRPC_USAGE_WRITES = {"RecordUsage", "RecordUsageBatch"}


# ---- REST ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("method", "path"), sorted(OWN_USAGE_ROUTES))
async def test_a_plain_key_reads_only_its_own_usage_over_rest(http: httpx.AsyncClient, world: World, method: str,
                                                              path: str, fmt: str) -> None:
    for key_id in (world.a, world.b):  # B too: a key is scoped to itself, not to its tenant (B2)
        for snoop in SNOOPS:
            resp = await http.request(method, path, params=_params(snoop, world, fmt), headers=world.auth(key_id))
            rows = _rows(resp, fmt)
            assert {r["key_id"] for r in rows} == {key_id}, (snoop, rows)
            assert {r["tenant_id"] for r in rows} == {world.tenants[key_id]}
            assert sum(int(r["requests"]) for r in rows) == len(world.requests[key_id])
            for other in world.others_of(key_id):
                assert other not in resp.text and world.plain[other] not in resp.text


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("method", "path"), sorted(ADMIN_USAGE_ROUTES | ADMIN_USAGE_ISH_ROUTES))
async def test_a_plain_key_is_refused_on_admin_usage_routes(http: httpx.AsyncClient, world: World, method: str,
                                                            path: str, fmt: str) -> None:
    for snoop in SNOOPS:
        resp = await http.request(method, path, params=_params(snoop, world, fmt), headers=world.auth(world.a))
        assert resp.status_code == 403, resp.text
        assert resp.headers["content-type"].startswith("application/json")
        body = resp.json()
        validate(body, "ErrorResponse")
        assert body["error"]["code"] == "insufficient_permissions"
        for other in world.others_of(world.a):
            assert other not in resp.text and world.plain[other] not in resp.text


@pytest.mark.parametrize(("method", "path"), sorted(OWN_USAGE_ROUTES | ADMIN_USAGE_ROUTES | ADMIN_USAGE_ISH_ROUTES))
async def test_rest_usage_routes_refuse_a_missing_wrong_or_revoked_key(http: httpx.AsyncClient, metering: Metering,  # noqa: F811
                                                                       world: World, method: str, path: str) -> None:
    a_plain = world.plain[world.a]
    metering.store.revoke_key(world.a)
    wrong = a_plain[:-1] + ("x" if a_plain[-1] != "x" else "y")
    for headers in ({}, {"authorization": f"Bearer {wrong}"}, {"authorization": f"Basic {world.plain[world.b]}"},
                    {"authorization": f"Bearer {a_plain}"}):
        resp = await http.request(method, path, params={"key_id": world.b}, headers=headers)
        assert resp.status_code == 401, (headers, resp.text)
        validate(resp.json(), "ErrorResponse")
        assert world.b not in resp.text and world.plain[world.b] not in resp.text


@pytest.mark.parametrize("fmt", FORMATS)
async def test_the_admin_key_sees_every_key_and_can_filter_over_rest(http: httpx.AsyncClient, world: World,
                                                                     fmt: str) -> None:
    async def keys(**params: str) -> set[str]:
        resp = await http.get("/admin/usage", params={**params, "format": fmt}, headers=world.auth(world.admin))
        return {r["key_id"] for r in _rows(resp, fmt)}

    assert await keys() == {world.a, world.b, world.b2, world.admin}
    assert await keys(key_id=world.b) == {world.b}
    assert await keys(tenant="t2") == {world.b, world.b2}
    assert await keys(tenant="t1") == {world.a}
    # /v1/usage is the caller's own, an admin key's too
    own = await http.get("/v1/usage", params={"format": fmt}, headers=world.auth(world.admin))
    assert {r["key_id"] for r in _rows(own, fmt)} == {world.admin}
    budgets = (await http.get("/admin/budgets", headers=world.auth(world.admin))).json()["data"]
    assert {b["subject"] for b in budgets} == {world.a, world.b, world.b2, world.admin}
    assert all(b["spent"] != "0" for b in budgets)


# ---- gRPC (metering) -------------------------------------------------------------------------------------

def _filters(w: World) -> list[dict[str, str]]:
    return [{}, {"key_id": w.b}, {"tenant_id": "t2"}, {"key_id": w.b, "tenant_id": "t2"},
            {"key_id": w.b2, "tenant_id": "t1"}]


@pytest.mark.parametrize("method", sorted(GRPC_USAGE_READS))
async def test_a_plain_key_reads_only_its_own_usage_over_grpc(metering: Metering, world: World,  # noqa: F811
                                                              method: str) -> None:
    read = GRPC_USAGE_READS[method]
    call = getattr(stub(metering), method)
    for key_id in (world.a, world.b):
        for filters in _filters(world):
            resp = await call(read.request(**filters), metadata=world.bearer(key_id), timeout=5)
            keys, tenants, request_ids = read.covers(resp)
            assert keys == {key_id} and tenants == {world.tenants[key_id]}, (filters, resp)
            assert request_ids in (set(), world.requests[key_id])
            raw = resp.SerializeToString()
            for other in world.others_of(key_id):
                assert other.encode() not in raw


@pytest.mark.parametrize("method", sorted(GRPC_USAGE_READS))
async def test_the_admin_key_sees_every_key_and_can_filter_over_grpc(metering: Metering, world: World,  # noqa: F811
                                                                     method: str) -> None:
    read = GRPC_USAGE_READS[method]
    call = getattr(stub(metering), method)

    async def covers(**filters: str) -> tuple[set[str], set[str], set[str]]:
        return read.covers(await call(read.request(**filters), metadata=world.bearer(world.admin), timeout=5))

    keys, _, request_ids = await covers()
    assert keys == {world.a, world.b, world.b2, world.admin}
    assert request_ids in (set(), set().union(*world.requests.values()))
    assert (await covers(key_id=world.b))[0] == {world.b}
    assert (await covers(tenant_id="t2"))[0] == {world.b, world.b2}
    assert (await covers(key_id=world.b, tenant_id="t1"))[0] == set()


@pytest.mark.parametrize("method", sorted(GRPC_USAGE_READS) + sorted(GRPC_ADMIN_USAGE_ISH))
async def test_grpc_usage_reads_refuse_a_missing_wrong_or_revoked_key(metering: Metering, world: World,  # noqa: F811
                                                                      method: str) -> None:
    s = stub(metering)
    request: Any = (GRPC_USAGE_READS[method].request(key_id=world.b) if method in GRPC_USAGE_READS
                    else GRPC_ADMIN_USAGE_ISH[method]())
    a_plain = world.plain[world.a]
    wrong = a_plain[:-1] + ("x" if a_plain[-1] != "x" else "y")
    await s.WhoAmI(metering_pb2.WhoAmIRequest(), metadata=world.bearer(world.a), timeout=5)  # valid until revoked
    metering.store.revoke_key(world.a)
    for md in ((), (("authorization", f"Bearer {wrong}"),), (("authorization", f"Basic {world.plain[world.b]}"),),
               (("authorization", "Bearer "),), world.bearer(world.a)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(s, method)(request, metadata=md, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (md, err.value)
        assert world.b not in (err.value.details() or "")


@pytest.mark.parametrize("method", sorted(GRPC_ADMIN_USAGE_ISH))
async def test_admin_only_usage_ish_reads_refuse_a_plain_key_over_grpc(metering: Metering, world: World,  # noqa: F811
                                                                       method: str) -> None:
    s = stub(metering)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(s, method)(GRPC_ADMIN_USAGE_ISH[method](), metadata=world.bearer(world.a), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin = await getattr(s, method)(GRPC_ADMIN_USAGE_ISH[method](), metadata=world.bearer(world.admin), timeout=5)
    assert world.b.encode() in admin.SerializeToString()  # the positive control: B is there for the admin


# ---- the guard: every usage route is one of the above ----------------------------------------------------

def _served_routes(app: FastAPI) -> set[tuple[str, str]]:
    """Every (method, path) the app serves, included routers' routes too (``app.routes`` nests those)."""
    return {(method, ctx.path) for ctx in iter_route_contexts(app.routes) if ctx.path
            for method in ctx.methods or ()}


def test_every_usage_route_is_covered() -> None:
    """A new route or RPC that reads usage fails here until it joins a table the tests above iterate."""
    served = _served_routes(create_app(GatewaySettings()))  # the app `inferplane up` serves; nothing connects
    assert {("POST", "/v1/chat/completions"), ("GET", "/admin/keys")} <= served  # the walk sees every router
    assert {r for r in served if "usage" in r[1]} == OWN_USAGE_ROUTES | ADMIN_USAGE_ROUTES
    assert served >= ADMIN_USAGE_ISH_ROUTES  # the usage-ish ones are still served (else the table is stale)

    methods = {m.name for m in metering_pb2.DESCRIPTOR.services_by_name["MeteringService"].methods}
    # RecordUsage/RecordUsageBatch are left out: the router's internal writes (see GRPC_USAGE_WRITES), which
    # return only a created flag and a cost, never anyone's records.
    assert {m for m in methods if "Usage" in m} - GRPC_USAGE_WRITES == set(GRPC_USAGE_READS)
    assert methods >= GRPC_USAGE_WRITES | set(GRPC_ADMIN_USAGE_ISH)
