"""``/v1/messages`` against the scripted fake router of ``test_gateway``: the conversion to ``Generate``, the
refusals, and the router's failures in Anthropic's error shape (before and after the stream started)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio

from inferplane.gateway.main import GatewayServer, GatewaySettings
from inferplane.v1 import router_pb2, router_pb2_grpc
from tests.integration.test_gateway import API_KEY, Stack, stack  # noqa: F401 (the fixture)

HEADERS = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
USER = [{"role": "user", "content": "Say hello"}]


def body(model: str = "tiny", **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 16, "messages": USER, **extra}


def anthropic_error(resp: httpx.Response, status: int, kind: str) -> str:
    assert resp.status_code == status, resp.text
    payload = resp.json()
    assert payload["type"] == "error" and payload["error"]["type"] == kind, payload
    assert set(payload["error"]) == {"type", "message"}
    return str(payload["error"]["message"])


def events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in text.strip().split("\n\n"):
        kind, data = frame.split("\n")
        out.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


async def test_request_becomes_the_chat_generate_request(stack: Stack) -> None:  # noqa: F811
    sent = body(system=[{"type": "text", "text": "Be ", "cache_control": {"type": "ephemeral"}},
                        {"type": "text", "text": "brief."}],
                messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text",
                                                                                              "text": "b"}]},
                          {"role": "user", "content": "c"}],
                temperature=0.5, top_p=0.9, top_k=40, stop_sequences=["\n\n"], metadata={"user_id": "u1"})
    async with httpx.AsyncClient(base_url=stack.base, timeout=10) as http:
        resp = await http.post("/v1/messages", headers=HEADERS, json=sent)
    assert resp.status_code == 200, resp.text
    msg = resp.json()
    assert msg["id"].startswith("msg_") and msg["type"] == "message" and msg["role"] == "assistant"
    assert msg["content"] == [{"type": "text", "text": "Hello world"}]
    assert msg["stop_reason"] == "end_turn" and msg["stop_sequence"] is None
    assert msg["usage"] == {"input_tokens": 5, "output_tokens": 3}
    req = stack.fake.calls[-1].request
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "Be brief."), ("user", "a"),
                                                                ("assistant", "b"), ("user", "c")]
    assert req.max_tokens == 16 and list(req.stop) == ["\n\n"]
    assert req.sampling.top_k == 40 and req.sampling.temperature == pytest.approx(0.5)
    assert stack.fake.calls[-1].metadata["authorization"] == f"Bearer {API_KEY}"


async def test_bearer_key_works_too_and_no_key_is_401(stack: Stack) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=stack.base, timeout=10) as http:
        ok = await http.post("/v1/messages", headers={"authorization": f"Bearer {API_KEY}"}, json=body())
        missing = await http.post("/v1/messages", json=body())
        wrong = await http.post("/v1/messages", headers={"x-api-key": "sk-wrong-SECRET"}, json=body())
    assert ok.status_code == 200
    anthropic_error(missing, 401, "authentication_error")
    assert "SECRET" not in anthropic_error(wrong, 401, "authentication_error")


@pytest.mark.parametrize(("sent", "field"), [
    (body(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]), "messages.0.content"),
    (body(messages=[*USER, {"role": "assistant", "content": "Sure"}]), "messages"),
    (body(messages=[{"role": "user", "content": [{"type": "text", "text": "a", "foo": 1}]}]),
     "messages.0.content.0.foo"),
    (body(system=[{"type": "text", "text": "a", "citations": [{}]}]), "system.0.citations"),
    (body(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
    (body(thinking={"type": "enabled", "budget_tokens": 1024}), "thinking"),
    (body(tool_choice={"type": "auto"}), "tool_choice"),
    (body(max_tokens=0), "max_tokens"),
    (body(max_tokens=10**12), "max_tokens"),
    (body(temperature=1.5), "temperature"),
    (body(stop_sequences=["a", "b", "c", "d", "e"]), "stop_sequences"),
    (body(metadata={"user_id": "u", "other": 1}), "metadata.other"),
    ({"model": "tiny", "messages": USER}, "max_tokens"),
])
async def test_refusals_are_400_naming_the_field(stack: Stack, sent: dict[str, Any], field: str) -> None:  # noqa: F811
    calls = len(stack.fake.calls)
    async with httpx.AsyncClient(base_url=stack.base, timeout=10) as http:
        resp = await http.post("/v1/messages", headers=HEADERS, json=sent)
    assert anthropic_error(resp, 400, "invalid_request_error").startswith(f"{field}:")
    assert len(stack.fake.calls) == calls  # refused before the router


@pytest.mark.parametrize(("model", "status", "kind"), [
    ("no-such-model", 404, "not_found_error"), ("limited", 429, "rate_limit_error"),
    ("forbidden", 403, "permission_error"), ("down", 529, "overloaded_error"), ("internal", 500, "api_error"),
    ("bad-param", 400, "invalid_request_error"),
])
async def test_router_failures_in_anthropic_shape(stack: Stack, model: str, status: int, kind: str) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=stack.base, timeout=10) as http:
        for stream in (False, True):
            resp = await http.post("/v1/messages", headers=HEADERS, json=body(model, stream=stream))
            assert "SECRET" not in anthropic_error(resp, status, kind)
            if model == "limited":
                assert resp.headers["retry-after"] == "7"


async def test_stream_events_and_an_error_after_the_start(stack: Stack) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=stack.base, timeout=10) as http:
        ok = await http.post("/v1/messages", headers=HEADERS, json=body("tiny-length", stream=True))
        broken = await http.post("/v1/messages", headers=HEADERS, json=body("broken-mid", stream=True))
    assert ok.headers["content-type"].startswith("text/event-stream")
    got = events(ok.text)
    assert [k for k, _ in got] == ["message_start", "content_block_start", "ping", "content_block_delta",
                                   "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == kind for kind, data in got)
    assert "".join(d["delta"]["text"] for k, d in got if k == "content_block_delta") == "abcd"
    assert got[-2][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert got[-2][1]["usage"] == {"input_tokens": 5, "output_tokens": 3}
    bad = events(broken.text)
    assert broken.status_code == 200 and bad[-1] == ("error", {"type": "error", "error": {
        "type": "overloaded_error", "message": "The server is overloaded or not ready yet. Please retry."}})


@pytest.mark.parametrize("raw", [b"{", b"null", b"[]", b'{"model": 1}'])
async def test_malformed_bodies_are_400(stack: Stack, raw: bytes) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=stack.base, timeout=10) as http:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            resp = await http.post(path, headers=HEADERS, content=raw)
            anthropic_error(resp, 400, "invalid_request_error")


# Generous deadlines: CI runs these on 2 shared cores.
DEADLINE_S = 30


async def test_stream_disconnect_cancels_the_router_call(stack: Stack) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=stack.base, timeout=DEADLINE_S) as http:
        async with http.stream("POST", "/v1/messages", json=body("hang", stream=True),
                               headers={**HEADERS, "x-request-id": "anth-gone-1"}) as response:
            async for line in response.aiter_lines():
                if '"first"' in line:
                    break  # leaving the block closes the connection mid-stream
    await asyncio.wait_for(stack.fake.cancelled["anth-gone-1"].wait(), DEADLINE_S)


async def test_non_stream_disconnect_cancels_the_router_call(stack: Stack) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=stack.base, timeout=DEADLINE_S) as http:
        request = asyncio.create_task(http.post("/v1/messages", json=body("hang"),
                                                headers={**HEADERS, "x-request-id": "anth-gone-2"}))
        await asyncio.wait_for(stack.fake.started["anth-gone-2"].wait(), DEADLINE_S)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    await asyncio.wait_for(stack.fake.cancelled["anth-gone-2"].wait(), DEADLINE_S)


# --- count_tokens through the gRPC RouterApi (the separate gateway) ------------------------------------------

class Counter(router_pb2_grpc.RouterServiceServicer):
    """Counts one token per character of the rendered roles and contents."""

    def __init__(self) -> None:
        self.seen: list[router_pb2.CountTokensRequest] = []

    async def CountTokens(self, request: router_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
                          ) -> router_pb2.CountTokensResponse:
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {API_KEY}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Incorrect API key provided.")
        if request.model != "tiny":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"The model `{request.model}` does not exist.")
        self.seen.append(request)
        count = sum(len(m.role) + len(m.content) for m in request.chat.messages)
        return router_pb2.CountTokensResponse(input_tokens=count, model=request.model)


@pytest_asyncio.fixture
async def counting() -> AsyncIterator[tuple[str, Counter]]:
    counter = Counter()
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(counter, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    gateway = GatewayServer(GatewaySettings(port=0, router_addr=f"127.0.0.1:{port}", request_timeout_s=DEADLINE_S,
                                           grace_seconds=1), handle_signals=False)
    task = asyncio.create_task(gateway.serve())
    try:
        await asyncio.wait_for(gateway.ready.wait(), DEADLINE_S)
        yield f"http://127.0.0.1:{gateway.port}", counter
    finally:
        gateway.should_exit = True
        await asyncio.wait_for(task, DEADLINE_S)
        await server.stop(None)


async def test_count_tokens_over_grpc(counting: tuple[str, Counter]) -> None:
    base, counter = counting
    sent = {"model": "tiny", "system": "ab", "messages": [{"role": "user", "content": [{"type": "text", "text": "c"}]}]}
    async with httpx.AsyncClient(base_url=base, timeout=DEADLINE_S) as http:
        ok = await http.post("/v1/messages/count_tokens", headers=HEADERS, json=sent)
        unknown = await http.post("/v1/messages/count_tokens", headers=HEADERS, json={**sent, "model": "nope"})
        bad_key = await http.post("/v1/messages/count_tokens", headers={"x-api-key": "sk-no"}, json=sent)
        max_tokens = await http.post("/v1/messages/count_tokens", headers=HEADERS, json={**sent, "max_tokens": 5})
    assert ok.status_code == 200 and ok.json() == {"input_tokens": len("system") + 2 + len("user") + 1}
    assert [(m.role, m.content) for m in counter.seen[0].chat.messages] == [("system", "ab"), ("user", "c")]
    anthropic_error(unknown, 404, "not_found_error")
    anthropic_error(bad_key, 401, "authentication_error")
    assert anthropic_error(max_tokens, 400, "invalid_request_error").startswith("max_tokens:")


# --- a seeded fuzz of the body: never a 5xx, every refusal in Anthropic's shape ---------------------------------

ODD_VALUES: list[Any] = [None, True, 0, -1, 1.5, 2**31, 2**63, 10**30, float("-inf"), "", "x" * 5000, "\u0000\ud7ff💥",
                         [], [None], [{}], {}, {"type": "text"}, {"type": "image"}, [[1]], {"a": {"b": [1]}}]
FIELDS = ["model", "max_tokens", "messages", "system", "temperature", "top_p", "top_k", "stop_sequences",
          "stream", "metadata", "cache_control", "unknown_field"]


def fuzz_cases(seed: int, n: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    cases = []
    for field in FIELDS:  # each field with each odd value, alone
        cases += [{**body(), field: v} for v in ODD_VALUES]
    nested = ["messages.0.role", "messages.0.content", "messages.0.content.0", "messages.0.content.0.text",
              "messages.0.content.0.type", "system.0", "metadata.user_id", "stop_sequences.0"]
    for _ in range(n):  # random nested replacements and field combinations
        case = body(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}], system=["x"],
                    metadata={"user_id": "u"}, stop_sequences=["s"])
        case["system"] = [{"type": "text", "text": "s"}]
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(nested + FIELDS).split(".")
            target: Any = case
            for part in path[:-1]:
                target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
                if not isinstance(target, dict | list):
                    break
            else:
                last = path[-1]
                value = rng.choice(ODD_VALUES)
                if isinstance(target, list) and target:
                    target[0] = value
                elif isinstance(target, dict):
                    target[last] = value
        cases.append(case)
    return cases


async def _fuzz(base: str, path: str, cases: list[dict[str, Any]]) -> int:
    """Post every case; return how many were answered 200."""
    ok = 0
    async with httpx.AsyncClient(base_url=base, timeout=DEADLINE_S) as http:
        for case in cases:
            resp = await http.post(path, headers=HEADERS, content=json.dumps(case, allow_nan=True).encode())
            assert resp.status_code < 500, (path, case, resp.text)
            if resp.status_code == 200:
                ok += 1
                continue
            payload = resp.json()
            assert payload["type"] == "error" and set(payload["error"]) == {"type", "message"}, payload
    return ok


async def test_fuzzed_messages_never_fail_the_server(stack: Stack) -> None:  # noqa: F811
    cases = fuzz_cases(seed=14, n=300)
    ok = await _fuzz(stack.base, "/v1/messages", cases)
    assert len(cases) > 500 and 0 < ok < len(cases)


async def test_fuzzed_count_tokens_never_fail_the_server(counting: tuple[str, Counter]) -> None:
    cases = [{k: v for k, v in case.items() if k not in ("max_tokens", "stream")} for case in fuzz_cases(7, 300)]
    ok = await _fuzz(counting[0], "/v1/messages/count_tokens", cases)
    assert 0 < ok < len(cases)
