"""``/v1/responses`` against a real router, in both edge modes (see ``test_edge_modes``): the same OpenAI errors
over gRPC (``GrpcRouter``) and in process (``InProcessRouter``), and the stored-response routes' key check."""

from __future__ import annotations

from typing import Any

import httpx

from tests.integration.test_admission import Metering, metering  # noqa: F401  (fixture)
from tests.integration.test_edge_modes import MODEL, clients, database_url  # noqa: F401  (fixtures)
from tests.openai_schema import validate


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": "Hello", "max_output_tokens": 16, **extra}


async def test_both_modes_answer_alike(clients: dict[str, httpx.AsyncClient],  # noqa: F811
                                       metering: Metering) -> None:  # noqa: F811
    _, key = metering.store.create_key("responses-modes")
    good = {"authorization": f"Bearer {key}"}
    bad_key = {"authorization": "Bearer sk-ip-abcdefabcdef-notakey"}
    cases: list[tuple[str, str, dict[str, str], dict[str, Any] | None, int, str | None]] = [
        ("POST", "/v1/responses", {}, _body(), 401, None),
        ("POST", "/v1/responses", bad_key, _body(), 401, None),
        ("POST", "/v1/responses", good, _body(model="no-such-model"), 404, "model"),
        ("POST", "/v1/responses", good, _body(max_output_tokens=10**6), 400, "max_output_tokens"),  # past the context
        ("POST", "/v1/responses", good, _body(), 503, None),  # no executor serves
        ("POST", "/v1/responses", good, _body(stream=True), 503, None),
        ("POST", "/v1/responses", good, _body(previous_response_id="resp_nope"), 404, "previous_response_id"),
        ("GET", "/v1/responses/resp_nope", bad_key, None, 401, None),
        ("GET", "/v1/responses/resp_nope", good, None, 404, None),
        ("DELETE", "/v1/responses/resp_nope", good, None, 404, None),
    ]
    for method, path, headers, body, status, param in cases:
        answers = {mode: await client.request(method, path, headers=headers, json=body, timeout=30)
                   for mode, client in clients.items()}
        got = {mode: (r.status_code, r.json()) for mode, r in answers.items()}
        assert got["in-router"] == got["separate"], (path, body)
        assert got["separate"][0] == status, (path, body, got["separate"])
        validate(got["separate"][1], "ErrorResponse")
        assert got["separate"][1]["error"]["param"] == param, got["separate"]
        assert key not in answers["separate"].text
