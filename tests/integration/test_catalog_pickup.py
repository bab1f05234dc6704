"""The catalog changed at run time: a model added, repriced and deleted through ``/admin/models`` reaches a running
``Router`` (real metering, real router, the gateway app) within its poll period, without a restart; a deleted
model is a 404 ``model_not_found`` in OpenAI's shape; only admin keys change the catalog."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from inferplane.assets import CATALOG
from inferplane.common.catalog import load_catalog
from inferplane.common.errors import NotFound
from inferplane.common.settings import ServerSettings
from inferplane.gateway.app import create_app
from inferplane.gateway.settings import GatewaySettings
from inferplane.metering.main import seed_catalog
from inferplane.router.main import Router
from inferplane.router.settings import RouterSettings
from tests.integration.test_admission import Metering, metering  # noqa: F401  (fixture)
from tests.integration.test_edge_modes import database_url  # noqa: F401  (fixture: SQLite)
from tests.openai_schema import validate

POLL_S = 0.2
CHAT = "/v1/chat/completions"


@pytest_asyncio.fixture
async def stack(metering: Metering, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Router]]:  # noqa: F811
    seed_catalog(metering.store, CATALOG)  # what metering does at its start
    metering_addr = f"127.0.0.1:{metering.server.port}"
    router = Router(RouterSettings(server=ServerSettings(port=0, grace_seconds=0), metering_addr=metering_addr,
                                   executor_addrs=["127.0.0.1:9"], outbox_path=tmp_path / "outbox.db",
                                   request_timeout_s=10, catalog_poll_s=POLL_S))
    router.outbox.start()
    await router.server.start()
    router.catalog_watch.start()
    app = create_app(GatewaySettings(router_addr=f"127.0.0.1:{router.server.port}", metering_addr=metering_addr,
                                     request_timeout_s=10))
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            yield client, router
    finally:
        await router.stop(0)


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float) -> float:
    """Seconds until ``check`` holds; fails the test when it does not within ``within_s``."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < within_s, f"not within {within_s}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_a_model_added_repriced_and_deleted_reaches_the_router_without_a_restart(
        stack: tuple[httpx.AsyncClient, Router], metering: Metering) -> None:  # noqa: F811
    client, router = stack
    _, admin = metering.store.create_key("ops", scopes=["admin"])
    _, user = metering.store.create_key("app")

    async def listed() -> dict[str, Any]:
        r = await client.get("/v1/models", headers=_bearer(user))
        return {m["id"]: m for m in r.json()["data"]}

    async def chat() -> httpx.Response:
        return await client.post(CHAT, headers=_bearer(user), json={
            "model": "my-finetune", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})

    assert "my-finetune" not in await listed()
    body = {"id": "my-finetune", "triton_model": "tiny-llama",
            "price": {"input_per_million": "1.00", "output_per_million": "2.00", "per_request": "0.000001"}}
    refused = await client.post("/admin/models", headers=_bearer(user), json=body)
    assert refused.status_code == 403, refused.text
    created = await client.post("/admin/models", headers=_bearer(admin), json=body)
    assert created.status_code == 201, created.text
    made = created.json()
    assert (made["id"], made["triton_model"], made["version"], made["versions"]) == (
        "my-finetune", "tiny-llama", 1, {"1": "tiny-llama"})
    assert made["settings"]["tokenizer"] == "models/tiny-llama"  # copied from the model serving tiny-llama
    assert made["price"]["per_request"] == "0.000001"

    async def appeared() -> bool:
        return "my-finetune" in await listed()

    took = await eventually(appeared, within_s=POLL_S + 2)
    entry = (await listed())["my-finetune"]
    assert entry["pricing"]["input_per_million_tokens"] == "1" and entry["pricing"]["per_request"] == "0.000001", entry
    assert entry["context_length"] == 512
    # it resolves, tokenizes with tiny-llama's tokenizer and reaches admission: here no executor serves (503)
    served = await chat()
    assert served.status_code == 503, served.text
    assert router.engine.model("my-finetune").version == 1
    print(f"picked up in {took:.2f}s")

    again = await client.post("/admin/models", headers=_bearer(admin), json=body)
    assert again.status_code == 400 and "already exists" in again.json()["error"]["message"], again.text

    patched = await client.patch("/admin/models/my-finetune", headers=_bearer(admin),
                                 json={"price": {"input_per_million": "3.00"}, "settings": {"context_length": 256}})
    assert patched.status_code == 200 and patched.json()["catalog_version"] > made["catalog_version"], patched.text

    async def repriced() -> bool:
        m = (await listed()).get("my-finetune", {})
        return m.get("context_length") == 256 and m["pricing"]["input_per_million_tokens"] == "3"

    await eventually(repriced, within_s=POLL_S + 2)

    catalog = await client.get("/admin/models", headers=_bearer(admin))
    assert catalog.status_code == 200 and "my-finetune" in [m["id"] for m in catalog.json()["data"]]
    assert (await client.get("/admin/models", headers=_bearer(user))).status_code == 403

    deleted = await client.delete("/admin/models/my-finetune", headers=_bearer(admin))
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True, deleted.text

    async def gone() -> bool:
        return "my-finetune" not in await listed()

    await eventually(gone, within_s=POLL_S + 2)
    missing = await chat()
    assert missing.status_code == 404, missing.text
    validate(missing.json(), "ErrorResponse")
    assert missing.json()["error"]["code"] == "model_not_found" and missing.json()["error"]["param"] == "model"
    again_gone = await client.delete("/admin/models/my-finetune", headers=_bearer(admin))
    assert again_gone.status_code == 404 and again_gone.json()["error"]["code"] == "model_not_found"


async def test_bad_model_bodies_are_openai_shaped_400s(stack: tuple[httpx.AsyncClient, Router],
                                                       metering: Metering) -> None:  # noqa: F811
    client, _ = stack
    _, admin = metering.store.create_key("ops", scopes=["admin"])
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"id": "x"}, None),  # no triton_model
        ({"id": "x", "triton_model": "tiny-llama", "colour": "red"}, "colour"),
        ({"id": "x", "triton_model": "tiny-llama", "settings": {"colour": "red"}}, "spec"),
        ({"id": "x", "triton_model": "tiny-llama", "settings": {"context_length": 0}}, "context_length"),
        ({"id": "x", "triton_model": "tiny-llama", "price": {"per_request": "0.0000000001"}}, "price.per_request"),
    ]
    for body, param in cases:
        r = await client.post("/admin/models", headers=_bearer(admin), json=body)
        assert r.status_code == 400, (body, r.text)
        validate(r.json(), "ErrorResponse")
        if param is not None:
            assert r.json()["error"]["param"] == param, (body, r.text)
    assert "x" not in [m.id for m in metering.store.catalog()[1]]


async def test_requests_in_flight_keep_their_model_when_it_is_deleted(stack: tuple[httpx.AsyncClient, Router],
                                                                      metering: Metering) -> None:  # noqa: F811
    _, router = stack
    model = router.engine.model("tiny-llama")  # a request looks its model up once, at its start
    gate = router.engine.capacity.gate("tiny-llama")
    await gate.acquire(timeout=1.0)  # one request runs (no executor serves: one slot) ...
    waiting = asyncio.create_task(gate.acquire(timeout=10.0))  # ... and one waits for its slot
    await asyncio.sleep(0)
    metering.store.delete_model("tiny-llama")

    async def gone() -> bool:
        return router.engine.catalog.get("tiny-llama") is None

    await eventually(gone, within_s=POLL_S + 2)
    gate.release()  # the first ends after its model left: its slot passes to the waiter, sized as before
    await asyncio.wait_for(waiting, 1.0)
    gate.release()
    assert (model.id, model.triton_model) == ("tiny-llama", "tiny-llama")
    with pytest.raises(NotFound):
        router.engine.model("tiny-llama")  # a new request: 404


async def test_a_catalog_the_router_cannot_build_leaves_the_one_in_force(stack: tuple[httpx.AsyncClient, Router],
                                                                         metering: Metering) -> None:  # noqa: F811
    _, router = stack
    await eventually(lambda: _true(router.catalog_watch.version == metering.store.catalog_version()), POLL_S + 2)
    # valid for metering (a path is a path), but this router has no such package to find the tokenizer in
    _, bad = metering.store.create_model("elsewhere", {"tokenizer": "package:no_such_package_here/tok"},
                                         {1: "tiny-llama"})
    await eventually(lambda: _true(router.catalog_watch.version == bad), POLL_S + 2)
    assert router.engine.catalog.get("elsewhere") is None and router.engine.catalog.get("tiny-llama") is not None
    metering.store.delete_model("elsewhere")  # the next good version is taken
    await eventually(lambda: _true(router.catalog_watch.version == bad + 1), POLL_S + 2)
    assert [m.id for m in router.engine.catalog.models] == [m.id for m in load_catalog(CATALOG).models]


async def _true(value: bool) -> bool:
    return value
