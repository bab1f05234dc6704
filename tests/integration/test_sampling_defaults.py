"""An absent ``temperature`` through the real services (gateway, router, metering's catalog, an executor on a real
Triton serving tiny-llama): the shipped model samples at its catalog ``default_temperature`` of 1.0, as OpenAI's API
promises (eight choices of one request are not all the same text), and a model whose catalog sets
``default_temperature: 0`` answers such a request greedily (every choice the text of an explicit ``temperature: 0``)."""

from __future__ import annotations

import httpx
import pytest

from inferplane.router.main import Router
from tests.integration.test_admission import Metering, metering  # noqa: F401  (fixture)
from tests.integration.test_edge_modes import database_url  # noqa: F401  (fixture: SQLite)
from tests.integration.triton_stack import eventually, stack  # noqa: F401  (fixture)

pytestmark = pytest.mark.triton
GREEDY_COPY = "greedy-llama"


async def test_absent_temperature_samples_at_the_catalog_default(
        stack: tuple[httpx.AsyncClient, Router], metering: Metering) -> None:  # noqa: F811
    gateway, router = stack
    _, admin_key = metering.store.create_key("ops", scopes=["admin"])
    _, user_key = metering.store.create_key("app")
    admin, user = {"authorization": f"Bearer {admin_key}"}, {"authorization": f"Bearer {user_key}"}
    made = await gateway.post("/admin/models", headers=admin, json={
        "id": GREEDY_COPY, "triton_model": "tiny-llama",
        "settings": {"tasks": ["chat", "completion"], "tokenizer": "models/tiny-llama", "context_length": 512,
                     "default_temperature": 0}})
    assert made.status_code == 201, made.text

    async def ready() -> bool:
        return (router.catalog_watch.version >= made.json()["catalog_version"]
                and router.engine.executors.serving_count("tiny-llama") > 0)

    await eventually(ready, 60, "the router polled the catalog and sees tiny-llama served")

    async def texts(model: str, n: int, **extra: object) -> list[str]:
        r = await gateway.post("/v1/completions", headers=user, json={
            "model": model, "prompt": "Return the", "max_tokens": 12, "n": n, "ignore_eos": True, **extra})
        assert r.status_code == 200, r.text
        return [c["text"] for c in r.json()["choices"]]

    sampled = await texts("tiny-llama", 8)
    assert len(set(sampled)) > 1, f"eight choices at temperature 1 came out the same: {sampled!r}"
    greedy = await texts("tiny-llama", 1, temperature=0)
    assert await texts(GREEDY_COPY, 3) == greedy * 3
    # the request's own temperature wins over the catalog's
    assert len(set(await texts(GREEDY_COPY, 8, temperature=1))) > 1
