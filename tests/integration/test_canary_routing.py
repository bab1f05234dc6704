"""A canary split through the real services: metering (the catalog and the ledger), a router polling it, an
executor on a real Triton serving tiny-llama, and the gateway app. A model whose versions 1 and 2 both name
tiny-llama gets a 50/50 split through ``PATCH /admin/models``; each request (its own ``user``) is stamped on its
usage record with exactly the version ``choose_version`` gives that user; a user asking again lands on the same
version; ``/promote`` sends everyone to version 2."""

from __future__ import annotations

import httpx
import pytest

from inferplane.router.canary import choose_version
from inferplane.router.main import Router
from tests.integration.test_admission import Metering, metering  # noqa: F401  (fixture)
from tests.integration.test_edge_modes import database_url  # noqa: F401  (fixture: SQLite)
from tests.integration.triton_stack import eventually, stack  # noqa: F401  (fixture)

pytestmark = pytest.mark.triton
MODEL = "canary-llama"
USERS = [f"user-{i}" for i in range(24)]


async def test_a_split_serves_each_user_its_version_and_promote_moves_everyone(
        stack: tuple[httpx.AsyncClient, Router], metering: Metering) -> None:  # noqa: F811
    gateway, router = stack

    async def in_force(change: httpx.Response) -> None:
        async def polled() -> bool:
            return router.catalog_watch.version >= change.json()["catalog_version"]

        await eventually(polled, 10, "the router polled the change")
    _, admin_key = metering.store.create_key("ops", scopes=["admin"])
    _, user_key = metering.store.create_key("app")
    admin, user = {"authorization": f"Bearer {admin_key}"}, {"authorization": f"Bearer {user_key}"}

    made = await gateway.post("/admin/models", headers=admin, json={
        "id": MODEL, "versions": {"1": "tiny-llama", "2": "tiny-llama"}, "version": 1})
    assert made.status_code == 201, made.text
    assert made.json()["traffic"] == {"1": 100}
    bad = await gateway.patch(f"/admin/models/{MODEL}", headers=admin, json={"traffic": {"1": 60, "2": 30}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "traffic", bad.text
    assert "sum to 90" in bad.json()["error"]["message"]
    split = await gateway.patch(f"/admin/models/{MODEL}", headers=admin, json={"traffic": {"1": 50, "2": 50}})
    assert split.status_code == 200 and split.json()["traffic"] == {"1": 50, "2": 50}, split.text

    await in_force(split)

    async def ask(u: str, rid: str) -> None:
        r = await gateway.post("/v1/chat/completions", headers={**user, "x-request-id": rid}, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "user": u})
        assert r.status_code == 200, r.text

    async def stamped(prefix: str, count: int) -> dict[str, int]:
        async def all_in() -> bool:
            return len([r for r in metering.store.list_usage(limit=500) if r.request_id.startswith(prefix)]) == count

        await eventually(all_in, 30, "usage records")
        return {r.request_id: r.model_version for r in metering.store.list_usage(limit=500)
                if r.request_id.startswith(prefix)}

    async def serving() -> bool:
        return router.engine.executors.serving_count("tiny-llama") > 0

    await eventually(serving, 30, "the router sees the executor serving tiny-llama")
    await ask("warm-up", "warm-up")  # the executor's first request (Triton's model warm-up) is not measured
    for u in USERS:
        await ask(u, f"split-{u}")
    for u in USERS[:6]:  # the same users again: the same versions
        await ask(u, f"again-{u}")
    versions = await stamped("split-", len(USERS))
    expected = {f"split-{u}": choose_version({1: 50, 2: 50}, MODEL, u) for u in USERS}
    assert versions == expected
    assert set(versions.values()) == {1, 2}  # 24 users at 50/50: both sides served
    again = await stamped("again-", 6)
    assert all(again[f"again-{u}"] == versions[f"split-{u}"] for u in USERS[:6])

    promoted = await gateway.post(f"/admin/models/{MODEL}/promote", headers=admin, json={"version": 2})
    assert promoted.status_code == 200, promoted.text
    assert (promoted.json()["version"], promoted.json()["traffic"]) == (2, {"2": 100})
    missing = await gateway.post("/admin/models/no-such-model/promote", headers=admin, json={"version": 2})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found", missing.text
    await in_force(promoted)
    for u in USERS[:12]:
        await ask(u, f"promoted-{u}")
    assert set((await stamped("promoted-", 12)).values()) == {2}
