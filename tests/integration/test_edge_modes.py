"""The REST edge answers alike in the router's process and as a separate gateway.

One real ``Router`` (real metering, the catalog's tokenizers, an executor address where nothing listens) serves
gRPC; one gateway app calls it over gRPC (``GrpcRouter``), another calls its servicer in process
(``InProcessRouter``). The same bad requests go through both: status, body and the forwarded headers must match,
and each is a real refusal with the status expected, so the comparison cannot pass by both answering alike wrongly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from inferplane.cli.inprocess import InProcessRouter
from inferplane.common.settings import ServerSettings
from inferplane.gateway.app import create_app
from inferplane.gateway.settings import GatewaySettings
from inferplane.router.main import Router
from inferplane.router.settings import RouterSettings
from tests.integration.test_admission import Metering, metering  # noqa: F401  (fixture)

MODEL = "tiny-llama"
CHAT = "/v1/chat/completions"
FORWARDED = ("retry-after", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests")


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'metering.db'}"


@pytest_asyncio.fixture
async def clients(metering: Metering, tmp_path: Path) -> AsyncIterator[dict[str, httpx.AsyncClient]]:  # noqa: F811
    metering_addr = f"127.0.0.1:{metering.server.port}"
    router = Router(RouterSettings(server=ServerSettings(port=0, grace_seconds=0), metering_addr=metering_addr,
                                   executor_addrs=["127.0.0.1:9"], outbox_path=tmp_path / "outbox.db",
                                   request_timeout_s=10))
    router.outbox.start()
    await router.server.start()
    settings = GatewaySettings(router_addr=f"127.0.0.1:{router.server.port}", metering_addr=metering_addr,
                               request_timeout_s=10)
    apps = {"separate": create_app(settings),
            "in-router": create_app(settings, router=InProcessRouter(router.servicer, timeout_s=10,
                                                                     serving=lambda: True))}
    async with AsyncExitStack() as stack:
        out = {}
        for mode, app in apps.items():
            await stack.enter_async_context(app.router.lifespan_context(app))
            out[mode] = await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw"))
        try:
            yield out
        finally:
            await router.stop(0)


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **extra}


async def test_both_modes_refuse_bad_requests_identically(clients: dict[str, httpx.AsyncClient],
                                                          metering: Metering) -> None:  # noqa: F811
    _, key = metering.store.create_key("edge-modes")
    good = {"authorization": f"Bearer {key}"}
    bad_key = {"authorization": "Bearer sk-ip-abcdefabcdef-notakey"}
    cases: list[tuple[str, str, dict[str, str], dict[str, Any] | None, int]] = [
        ("POST", CHAT, {}, _chat(), 401),  # no key: refused before the router
        ("POST", CHAT, bad_key, _chat(), 401),  # metering does not know it
        ("POST", CHAT, good, _chat(model="no-such-model"), 404),
        ("POST", CHAT, good, _chat(model="no-such-model", stream=True), 404),
        ("POST", CHAT, good, _chat(max_tokens=10**6), 400),  # past the model's context
        ("POST", CHAT, good, _chat(), 503),  # no executor serves
        ("POST", CHAT, good, _chat(stream=True), 503),
        ("POST", "/v1/completions", good, {"model": MODEL, "prompt": "x", "temperature": 7}, 400),  # pydantic
        ("POST", "/v1/embeddings", good, {"model": "no-such-model", "input": "x"}, 404),
        ("POST", "/v1/embeddings", bad_key, {"model": MODEL, "input": "x"}, 401),
        ("GET", "/v1/models", bad_key, None, 401),
    ]
    for method, path, headers, body, status in cases:
        answers = {}
        for mode, client in clients.items():
            resp = await client.request(method, path, headers=headers, json=body, timeout=30)
            answers[mode] = (resp.status_code, resp.json(), {h: resp.headers.get(h) for h in FORWARDED})
        assert answers["in-router"] == answers["separate"], (path, body)
        assert answers["separate"][0] == status, (path, body, answers["separate"])
        assert set(answers["separate"][1]["error"]) == {"message", "type", "param", "code"}


async def test_both_modes_list_the_same_models(clients: dict[str, httpx.AsyncClient],
                                               metering: Metering) -> None:  # noqa: F811
    _, key = metering.store.create_key("edge-modes")
    bodies = [(await c.get("/v1/models", headers={"authorization": f"Bearer {key}"})).json()
              for c in clients.values()]
    assert bodies[0] == bodies[1]
    assert MODEL in {m["id"] for m in bodies[0]["data"]}


async def test_health_and_one_registry_in_both_modes(clients: dict[str, httpx.AsyncClient],
                                                     metering: Metering) -> None:  # noqa: F811
    _, key = metering.store.create_key("edge-modes")
    for client in clients.values():
        assert (await client.get("/healthz")).json() == {"status": "ok"}
    labels = {"grpc_service": "inferplane.v1.RouterService", "grpc_method": "ListModels", "grpc_code": "OK"}

    def handled() -> float:
        return REGISTRY.get_sample_value("inferplane_grpc_server_handled_total", labels) or 0.0

    # An in-process call counts as the router's RPC, as a gRPC one does; and the gateway's /metrics shows it: one
    # process, one registry (a name registered twice would have failed at import).
    before = handled()
    assert (await clients["in-router"].get("/v1/models", headers={"authorization": f"Bearer {key}"})).status_code == 200
    assert handled() == before + 1
    text = (await clients["in-router"].get("/metrics")).text
    assert 'grpc_method="ListModels"' in text and "inferplane_gateway_http_requests_total" in text
