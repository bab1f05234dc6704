"""End to end against the stack ``inferplane up`` starts: register ``my-finetune`` (a second public id for the
deployed tiny-llama, with its own price) through ``/admin/models`` → listed in ``/v1/models`` with its price →
chat completions work → the usage record carries its price and model version → delete → 404 in OpenAI's shape.
No restart anywhere: the router and the tokenizer service poll metering's catalog version."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from inferplane.cli.launcher import LocalStack
from inferplane.common.money import PriceNanos
from inferplane.metering.secret import load_secret
from inferplane.metering.store import MeteringStore
from tests.openai_schema import validate

pytestmark = pytest.mark.e2e
MODEL = "my-finetune"
PRICE = {"input_per_million": "1.50", "output_per_million": "3.00", "per_request": "0.000002"}
PRICE_NANOS = PriceNanos(1_500_000_000, 3_000_000_000, 2_000)
PICKUP_S = 10.0  # the poll period (2 s) with room for a loaded machine


def wait_for(check: Callable[[], bool], within_s: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within_s, f"{what}: not within {within_s}s"
        time.sleep(0.1)
    return time.monotonic() - start


def test_register_price_serve_bill_and_delete_a_model(stack: LocalStack, api_key: str) -> None:
    root = stack.base_url.removesuffix("/v1")
    admin = {"authorization": f"Bearer {stack.create_admin_key()}"}
    user = {"authorization": f"Bearer {api_key}"}
    client = openai.OpenAI(base_url=stack.base_url, api_key=api_key, max_retries=0, timeout=120)
    http = httpx.Client(base_url=root, timeout=30)

    def listed() -> dict[str, Any]:
        return {m["id"]: m for m in http.get("/v1/models", headers=user).json()["data"]}

    made = http.post("/admin/models", headers=admin, json={"id": MODEL, "triton_model": "tiny-llama", "price": PRICE})
    assert made.status_code == 201, made.text
    took = wait_for(lambda: MODEL in listed(), PICKUP_S, "listed")
    entry = listed()[MODEL]
    assert entry["pricing"] == {"currency": "USD", "input_per_million_tokens": "1.5",
                                "cached_input_per_million_tokens": "1.5",  # none set: the input price
                                "output_per_million_tokens": "3", "per_request": "0.000002",
                                "version": made.json()["price"]["version"]}, entry
    assert [m.id for m in client.models.list().data].count(MODEL) == 1

    # the router lists it first; the tokenizer service (this stack encodes there) polls the catalog on its own and
    # may answer 404 "no tokenizer" for up to one poll period (docs/catalog.md): wait for the first answer
    deadline = time.monotonic() + PICKUP_S
    while True:
        try:
            reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                                   max_tokens=8, temperature=0)
            break
        except openai.NotFoundError:
            if time.monotonic() > deadline:
                http.delete(f"/admin/models/{MODEL}", headers=admin)  # leave the session's stack as it was
                raise
            time.sleep(0.2)
    validate(reply.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    assert reply.model == MODEL and reply.usage is not None and reply.usage.completion_tokens > 0

    # the ledger: its price version, its model version, the cost at its own price
    store = MeteringStore(f"sqlite:///{stack.state / 'metering.db'}",
                          load_secret(secret=None, secret_file=stack.state / "metering-secret"))
    try:
        def recorded() -> bool:
            return any(r.model == MODEL for r in store.list_usage(limit=50))

        wait_for(recorded, 15.0, "usage record")
        [row] = [r for r in store.list_usage(limit=50) if r.model == MODEL]
    finally:
        store.close()
    assert (row.prompt_tokens, row.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert row.model_version == 1 and row.price_version == made.json()["price"]["version"]
    assert row.cost_nanos == PRICE_NANOS.cost(row.prompt_tokens, row.completion_tokens)
    summary = http.get("/admin/usage", headers=admin).json()["data"]
    assert any(r["model"] == MODEL and r["requests"] == 1 for r in summary), summary

    gone = http.delete(f"/admin/models/{MODEL}", headers=admin)
    assert gone.status_code == 200, gone.text
    wait_for(lambda: MODEL not in listed(), PICKUP_S, "unlisted")
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    body = err.value.response.json()
    validate(body, "ErrorResponse")
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model", body
    print(f"my-finetune listed {took:.2f}s after POST /admin/models")
