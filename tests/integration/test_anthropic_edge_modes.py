"""``/v1/messages`` and ``count_tokens`` against a real router, in both edge modes (see ``test_edge_modes``):
the same answers over gRPC (``GrpcRouter``) and in process (``InProcessRouter``), in Anthropic's shape."""

from __future__ import annotations

from typing import Any

import httpx

from tests.integration.test_admission import Metering, metering  # noqa: F401  (fixture)
from tests.integration.test_edge_modes import MODEL, clients, database_url  # noqa: F401  (fixtures)

MESSAGES = "/v1/messages"
COUNT = "/v1/messages/count_tokens"


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **extra}


def _count(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "system": "Be brief.", "messages": [{"role": "user", "content": "Hello"}], **extra}


async def test_both_modes_answer_alike_in_anthropic_shape(clients: dict[str, httpx.AsyncClient],  # noqa: F811
                                                          metering: Metering) -> None:  # noqa: F811
    _, key = metering.store.create_key("anthropic-modes")
    good = {"x-api-key": key}
    bad_key = {"x-api-key": "sk-ip-abcdefabcdef-notakey"}
    cases: list[tuple[str, dict[str, str], dict[str, Any], int, str]] = [
        (MESSAGES, {}, _body(), 401, "authentication_error"),
        (MESSAGES, bad_key, _body(), 401, "authentication_error"),
        (MESSAGES, good, _body(model="no-such-model"), 404, "not_found_error"),
        (MESSAGES, good, _body(max_tokens=10**6), 400, "invalid_request_error"),  # past the model's context
        (MESSAGES, good, _body(), 529, "overloaded_error"),  # no executor serves
        (MESSAGES, good, _body(stream=True), 529, "overloaded_error"),
        (COUNT, bad_key, _count(), 401, "authentication_error"),
        (COUNT, good, _count(model="no-such-model"), 404, "not_found_error"),
        (COUNT, good, _count(model="all-minilm-l6-v2"), 400, "invalid_request_error"),  # not a chat model
    ]
    for path, headers, body, status, kind in cases:
        answers = {mode: await client.post(path, headers=headers, json=body, timeout=30)
                   for mode, client in clients.items()}
        got = {mode: (r.status_code, r.json()) for mode, r in answers.items()}
        assert got["in-router"] == got["separate"], (path, body)
        assert got["separate"][0] == status, (path, body, got["separate"])
        assert got["separate"][1]["type"] == "error" and got["separate"][1]["error"]["type"] == kind
        assert key not in answers["separate"].text


async def test_count_tokens_counts_the_templated_chat(clients: dict[str, httpx.AsyncClient],  # noqa: F811
                                                      metering: Metering) -> None:  # noqa: F811
    _, key = metering.store.create_key("anthropic-count")
    counts = {}
    for mode, client in clients.items():
        short = await client.post(COUNT, headers={"authorization": f"Bearer {key}"}, json=_count(), timeout=30)
        longer = await client.post(COUNT, headers={"x-api-key": key}, json=_count(system="Be brief. " * 10),
                                   timeout=30)
        assert short.status_code == 200 and longer.status_code == 200, (short.text, longer.text)
        counts[mode] = (short.json()["input_tokens"], longer.json()["input_tokens"])
    assert counts["in-router"] == counts["separate"]
    short_n, longer_n = counts["separate"]
    assert 0 < short_n < longer_n
