"""``POST /tokenize`` and ``/detokenize`` (vLLM's shapes) through both REST edges (a separate gateway over gRPC, and
the one in the router's process) in front of a real ``Router`` with the catalog's tokenizers, and the same RPCs
over gRPC: the ids are the tokenizer's own, a conversation is rendered with the chat template as a chat completion
is, a round trip gives the text back, and errors are OpenAI's (401 without a key, 404 for an unknown model, 400
naming the param for bad input)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio

from inferplane.assets import CATALOG
from inferplane.common.settings import ServerSettings
from inferplane.router.main import Router
from inferplane.router.settings import RouterSettings
from inferplane.tokenization.local import TokenizerRegistry
from inferplane.v1 import router_pb2, router_pb2_grpc
from tests.integration.test_admission import Metering, metering  # noqa: F401  (fixture)
from tests.integration.test_edge_modes import MODEL, clients, database_url  # noqa: F401  (fixtures)
from tests.openai_schema import validate

EMBEDDING_MODEL = "all-minilm-l6-v2"
TEXT = "Hello, wörld! 😀"


def _headers(metering: Metering) -> dict[str, str]:  # noqa: F811
    _, key = metering.store.create_key("tokenize")
    return {"authorization": f"Bearer {key}"}


def _error(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    validate(response.json(), "ErrorResponse")
    assert response.json()["error"]["param"] == param, response.text
    return dict(response.json()["error"])


async def test_tokenize_and_detokenize_in_both_edges(clients: dict[str, httpx.AsyncClient],  # noqa: F811
                                                     metering: Metering) -> None:  # noqa: F811
    headers = _headers(metering)
    bundle = TokenizerRegistry.from_catalog_file(CATALOG).get(MODEL)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXT}]
    chat_ids, _ = bundle.encode_chat(messages)
    for mode, client in clients.items():
        text = (await client.post("/tokenize", json={"model": MODEL, "prompt": TEXT}, headers=headers)).json()
        assert text == {"count": len(bundle.encode(TEXT)), "max_model_len": 512, "tokens": bundle.encode(TEXT),
                        "token_strs": None}, mode
        special = (await client.post("/tokenize", json={"model": MODEL, "prompt": TEXT, "add_special_tokens": True},
                                     headers=headers)).json()
        assert special["tokens"] == bundle.encode(TEXT, add_special_tokens=True), mode
        chat = (await client.post("/tokenize", json={"model": MODEL, "messages": messages,
                                                     "add_generation_prompt": True}, headers=headers)).json()
        assert chat["tokens"] == chat_ids and chat["count"] == len(chat_ids), mode
        back = await client.post("/detokenize", json={"model": MODEL, "tokens": text["tokens"]}, headers=headers)
        assert back.status_code == 200 and back.json() == {"prompt": TEXT}, mode
        # special tokens are kept, as vLLM's /detokenize keeps them
        assert (await client.post("/detokenize", json={"model": MODEL, "tokens": chat_ids}, headers=headers)
                ).json() == {"prompt": bundle.decode(chat_ids, skip_special_tokens=False)}, mode
        embedding = (await client.post("/tokenize", json={"model": EMBEDDING_MODEL, "prompt": "hi",
                                                          "add_special_tokens": True}, headers=headers)).json()
        assert embedding["count"] == 3 and embedding["max_model_len"] == 512, mode  # [CLS] hi [SEP]


async def test_tokenize_errors_are_openai_shaped(clients: dict[str, httpx.AsyncClient],  # noqa: F811
                                                 metering: Metering) -> None:  # noqa: F811
    headers = _headers(metering)
    cases: list[tuple[str, dict[str, str], Any, int, str | None]] = [
        ("/tokenize", {}, {"model": MODEL, "prompt": "x"}, 401, None),
        ("/detokenize", {}, {"model": MODEL, "tokens": [1]}, 401, None),
        ("/tokenize", {"authorization": "Bearer sk-ip-abcdefabcdef-notakey"}, {"model": MODEL, "prompt": "x"}, 401,
         None),
        ("/tokenize", headers, {"model": "no-such-model", "prompt": "x"}, 404, "model"),
        ("/detokenize", headers, {"model": "no-such-model", "tokens": [1]}, 404, "model"),
        ("/tokenize", headers, {"model": MODEL}, 400, None),
        ("/tokenize", headers, {"model": MODEL, "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400,
         None),
        ("/tokenize", headers, {"model": MODEL, "prompt": 5}, 400, "prompt"),
        ("/tokenize", headers, {"model": MODEL, "prompt": "x", "return_token_strs": True}, 400, "return_token_strs"),
        ("/tokenize", headers, {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                "add_generation_prompt": False}, 400, "add_generation_prompt"),
        ("/tokenize", headers, {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                "add_special_tokens": True}, 400, "add_special_tokens"),
        ("/tokenize", headers, {"model": EMBEDDING_MODEL, "messages": [{"role": "user", "content": "x"}]}, 400,
         "messages"),  # no chat template
        ("/detokenize", headers, {"model": MODEL, "tokens": [10**9]}, 400, "tokens"),  # outside the vocabulary
        ("/detokenize", headers, {"model": MODEL, "tokens": [-1]}, 400, "tokens[0]"),
        ("/detokenize", headers, {"model": MODEL, "tokens": [10**12]}, 400, "tokens[0]"),
        ("/detokenize", headers, {"model": MODEL, "tokens": "abc"}, 400, "tokens"),
    ]
    for path, hdrs, body, status, param in cases:
        answers = [await c.post(path, json=body, headers=hdrs) for c in clients.values()]
        for response in answers:
            _error(response, status, param)
        assert answers[0].json() == answers[1].json(), (path, body)  # both edges answer alike
    for client in clients.values():
        assert (await client.get("/tokenize", headers=headers)).status_code == 405


@pytest_asyncio.fixture
async def router_addr(metering: Metering, tmp_path: Path) -> AsyncIterator[str]:  # noqa: F811
    router = Router(RouterSettings(server=ServerSettings(port=0, grace_seconds=0),
                                   metering_addr=f"127.0.0.1:{metering.server.port}", executor_addrs=["127.0.0.1:9"],
                                   outbox_path=tmp_path / "outbox.db", request_timeout_s=10))
    router.outbox.start()
    await router.server.start()
    try:
        yield f"127.0.0.1:{router.server.port}"
    finally:
        await router.stop(0)


async def test_tokenize_over_grpc(router_addr: str, metering: Metering) -> None:  # noqa: F811
    md = (("authorization", _headers(metering)["authorization"]),)
    bundle = TokenizerRegistry.from_catalog_file(CATALOG).get(MODEL)
    async with grpc.aio.insecure_channel(router_addr) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        resp = await stub.Tokenize(router_pb2.TokenizeRequest(model=MODEL, prompt=TEXT), metadata=md, timeout=10)
        assert list(resp.tokens) == bundle.encode(TEXT) and resp.max_model_len == 512
        text = await stub.Detokenize(router_pb2.DetokenizeRequest(model=MODEL, tokens=resp.tokens), metadata=md,
                                     timeout=10)
        assert text.prompt == TEXT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Tokenize(router_pb2.TokenizeRequest(model=MODEL, prompt="x"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Detokenize(router_pb2.DetokenizeRequest(model=MODEL, tokens=[10**9]), metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
