"""The REST gateway against a scripted fake router (a real ``grpc.aio`` server on an ephemeral port).

The fake is allowed here because these tests are about the gateway's own logic: translation, SSE
framing, error mapping, limits, metadata, cancellation. The model name selects the fake's script. Every
body and stream chunk is validated against OpenAI's OpenAPI schemas (``tests/openai_schema.py``), and
the requests the tests send against the request schemas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import pytest_asyncio
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from inferplane.common.errors import PARAM_METADATA_KEY
from inferplane.common.settings import load_settings
from inferplane.gateway.main import GatewayServer, GatewaySettings
from inferplane.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.integration.test_metering_gateway import ZERO_DETAILS
from tests.openai_schema import DERIVED_STREAM_COMPLETION, is_valid, validate

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-test-123"
BODY_LIMIT = 64 * 1024  # small, so an oversize body still fits the socket buffers of a refused upload
CREATED = 1_700_000_000
PIECES = ["Hel", "lo", " world"]


# --- the fake router ----------------------------------------------------------------------------------

@dataclass
class Seen:
    request: router_pb2.GenerateRequest
    metadata: dict[str, str]


@dataclass
class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    """Scripted by model name; per-request-id events let a test watch one call."""

    calls: list[Seen] = field(default_factory=list)
    started: defaultdict[str, asyncio.Event] = field(default_factory=lambda: defaultdict(asyncio.Event))
    cancelled: defaultdict[str, asyncio.Event] = field(default_factory=lambda: defaultdict(asyncio.Event))
    gates: defaultdict[str, asyncio.Event] = field(default_factory=lambda: defaultdict(asyncio.Event))

    def _msg(self, rid: str, model: str, text: str = "", finish: int = 0, usage: bool = False
             ) -> router_pb2.GenerateResponse:
        msg = router_pb2.GenerateResponse(request_id=rid, text=text, token_count=1 if text else 0,
                                          finish_reason=finish, created=CREATED, model=model)  # type: ignore[arg-type]
        if usage:
            msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.total_tokens = 5, 3, 8
        return msg

    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[router_pb2.GenerateResponse]:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.calls.append(Seen(request, md))
        rid, model = md.get("x-request-id", "no-id"), request.model
        await context.send_initial_metadata((("x-request-id", rid), ("x-ratelimit-remaining-requests", "99")))
        if md.get("authorization") != f"Bearer {API_KEY}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Incorrect API key provided.")
        self.started[rid].set()
        script = SCRIPTS.get(model)
        if script is None:
            context.set_trailing_metadata(((PARAM_METADATA_KEY, "model"),))
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"The model `{model}` does not exist or you do not have access to it.")
        assert script is not None
        try:
            async for msg in script(self, context, rid, model):
                yield msg
        except asyncio.CancelledError:
            self.cancelled[rid].set()
            raise

    async def ListModels(self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> router_pb2.ListModelsResponse:
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {API_KEY}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Incorrect API key provided.")
        return router_pb2.ListModelsResponse(models=[
            common_pb2.ModelInfo(id="tiny", owned_by="inferplane", created=CREATED,
                                 tasks=[common_pb2.MODEL_TASK_CHAT], context_length=512),
            common_pb2.ModelInfo(id="tiny-text", owned_by="", created=CREATED,
                                 tasks=[common_pb2.MODEL_TASK_COMPLETION], context_length=512)])


Script = Callable[[FakeRouter, grpc.aio.ServicerContext, str, str], AsyncIterator[router_pb2.GenerateResponse]]


async def _ok(fake: FakeRouter, ctx: grpc.aio.ServicerContext, rid: str, model: str
              ) -> AsyncIterator[router_pb2.GenerateResponse]:
    for piece in PIECES:
        yield fake._msg(rid, model, piece)
    yield fake._msg(rid, model, finish=common_pb2.FINISH_REASON_STOP, usage=True)


async def _length(fake: FakeRouter, ctx: grpc.aio.ServicerContext, rid: str, model: str
                  ) -> AsyncIterator[router_pb2.GenerateResponse]:
    yield fake._msg(rid, model, "abc")
    yield fake._msg(rid, model, "d", finish=common_pb2.FINISH_REASON_LENGTH, usage=True)


def _fail(code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()) -> Script:
    async def script(fake: FakeRouter, ctx: grpc.aio.ServicerContext, rid: str, model: str
                     ) -> AsyncIterator[router_pb2.GenerateResponse]:
        if trailing:
            ctx.set_trailing_metadata(trailing)
        await ctx.abort(code, details)
        yield fake._msg(rid, model)  # unreachable: abort raises

    return script


async def _broken_mid(fake: FakeRouter, ctx: grpc.aio.ServicerContext, rid: str, model: str
                      ) -> AsyncIterator[router_pb2.GenerateResponse]:
    yield fake._msg(rid, model, "partial")
    await ctx.abort(grpc.StatusCode.UNAVAILABLE, "executor went away")


async def _failed_finish(fake: FakeRouter, ctx: grpc.aio.ServicerContext, rid: str, model: str
                         ) -> AsyncIterator[router_pb2.GenerateResponse]:
    yield fake._msg(rid, model, "x")
    yield fake._msg(rid, model, finish=common_pb2.FINISH_REASON_ERROR, usage=True)


async def _hang(fake: FakeRouter, ctx: grpc.aio.ServicerContext, rid: str, model: str
                ) -> AsyncIterator[router_pb2.GenerateResponse]:
    yield fake._msg(rid, model, "first")
    await asyncio.Event().wait()  # until the call is cancelled


async def _gated(fake: FakeRouter, ctx: grpc.aio.ServicerContext, rid: str, model: str
                 ) -> AsyncIterator[router_pb2.GenerateResponse]:
    yield fake._msg(rid, model, "before")
    await fake.gates[rid].wait()
    yield fake._msg(rid, model, " after", finish=common_pb2.FINISH_REASON_STOP, usage=True)


async def _hang_first(fake: FakeRouter, ctx: grpc.aio.ServicerContext, rid: str, model: str
                      ) -> AsyncIterator[router_pb2.GenerateResponse]:
    await asyncio.Event().wait()
    yield fake._msg(rid, model)


SCRIPTS: dict[str, Script] = {
    "tiny": _ok, "tiny-text": _ok, "tiny-length": _length, "broken-mid": _broken_mid,
    "failed-finish": _failed_finish, "hang": _hang, "hang-first": _hang_first, "gated": _gated,
    "bad-param": _fail(grpc.StatusCode.INVALID_ARGUMENT, "Invalid 'max_tokens': too many.",
                       ((PARAM_METADATA_KEY, "max_tokens"),)),
    "limited": _fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "Rate limit reached for requests.",
                     (("retry-after", "7"), ("x-ratelimit-limit-requests", "60"))),
    "forbidden": _fail(grpc.StatusCode.PERMISSION_DENIED, "Key lacks scope model.request."),
    "down": _fail(grpc.StatusCode.UNAVAILABLE, "no executor"),
    "slow": _fail(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
    "internal": _fail(grpc.StatusCode.INTERNAL, "internal error: KeyError at engine.py:42 SECRET"),
}


# --- fixtures -----------------------------------------------------------------------------------------

@dataclass
class Stack:
    fake: FakeRouter
    router_port: int
    base: str  # http://127.0.0.1:<port>
    spans: InMemorySpanExporter
    sent: list[dict[str, Any]]  # JSON bodies the openai client sent
    client: openai.AsyncOpenAI

    def client_with_key(self, api_key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0)


@pytest_asyncio.fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    fake = FakeRouter()
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(fake, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    router_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set("inferplane.v1.RouterService", health_pb2.HealthCheckResponse.SERVING)

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    settings = GatewaySettings(port=0, router_addr=f"127.0.0.1:{router_port}", max_body_bytes=BODY_LIMIT,
                               request_timeout_s=30, grace_seconds=1)
    gateway = GatewayServer(settings, handle_signals=False, tracer_provider=provider)
    task = asyncio.create_task(gateway.serve())
    await asyncio.wait_for(gateway.ready.wait(), 10)

    sent: list[dict[str, Any]] = []

    async def capture(request: Any) -> None:
        if request.method == "POST":
            sent.append(json.loads(request.content))

    base = f"http://127.0.0.1:{gateway.port}"
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0,
                                http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [capture]}))
    try:
        yield Stack(fake, router_port, base, spans, sent, client)
    finally:
        await client.close()
        gateway.should_exit = True
        await asyncio.wait_for(task, 10)
        await server.stop(None)


@pytest_asyncio.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.base, timeout=10,
                                 headers={"authorization": f"Bearer {API_KEY}"}) as client:
        yield client


def chat_body(model: str = "tiny", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Say hello"}], **extra}


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition with a deadline (spans end just after the last byte is sent)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def sse(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    frames = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            frames.append(line.removeprefix("data: "))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return frames


def assert_error(response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    validate(body, "ErrorResponse")
    assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    assert re.fullmatch(r"[!-~]{1,128}", response.headers["x-request-id"])
    return dict(body["error"])


# --- chat completions ---------------------------------------------------------------------------------

async def test_chat_completion_via_openai_client(stack: Stack) -> None:
    raw = await stack.client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": [{"type": "text", "text": "Say "},
                                                             {"type": "text", "text": "hello"}]}],
        max_completion_tokens=16, max_tokens=99, temperature=0.5, top_p=0.9, seed=7, stop=["\n"], user="u1")
    body = json.loads(raw.text)
    validate(body, "CreateChatCompletionResponse")
    validate(stack.sent[-1], "CreateChatCompletionRequest")
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens == 8
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, **ZERO_DETAILS}
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    assert completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens == 0
    assert completion.model == "tiny" and completion.created == CREATED
    rid = raw.headers["x-request-id"]
    assert completion.id == f"chatcmpl-{rid}"
    assert raw.headers["x-ratelimit-remaining-requests"] == "99"

    seen = stack.fake.calls[-1]
    assert seen.metadata["authorization"] == f"Bearer {API_KEY}"
    assert seen.metadata["x-request-id"] == rid
    req = seen.request
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "Be brief."), ("user", "Say hello")]
    assert req.max_tokens == 16  # max_completion_tokens wins over max_tokens
    assert req.sampling.temperature == pytest.approx(0.5) and req.sampling.top_p == pytest.approx(0.9)
    assert req.sampling.seed == 7 and list(req.stop) == ["\n"] and not req.include_usage


async def test_chat_stream_via_openai_client(stack: Stack) -> None:
    stream = await stack.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    validate(stack.sent[-1], "CreateChatCompletionRequest")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
    assert stack.fake.calls[-1].request.include_usage


@pytest.mark.parametrize("include_usage", [True, False])
async def test_chat_stream_frames(stack: Stack, http: httpx.AsyncClient, include_usage: bool) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": include_usage})
    validate(body, "CreateChatCompletionRequest")
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = await sse(response)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert {c["id"] for c in chunks} == {f"chatcmpl-{response.headers['x-request-id']}"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    if include_usage:
        *chunks, last = chunks
        assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 5, "completion_tokens": 3,
                                                           "total_tokens": 8, **ZERO_DETAILS}
        assert last["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert all(c["usage"] is None for c in chunks)
    else:
        assert all("usage" not in c for c in chunks)
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == PIECES
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_one_sse_write_per_router_message(stack: Stack, http: httpx.AsyncClient) -> None:
    # The opening chunk goes out with the first text, and finish + usage + [DONE] in the last message's write:
    # as many writes as the router sent messages (inferplane_gateway_sse_writes_total counts them per hop).
    def writes() -> float:
        return REGISTRY.get_sample_value("inferplane_gateway_sse_writes_total") or 0.0

    before = writes()
    body = chat_body(stream=True, stream_options={"include_usage": True})
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        frames = await sse(response)
    assert frames[-1] == "[DONE]" and len(frames) == 1 + len(PIECES) + 2 + 1  # opening, texts, finish, usage, done
    assert writes() - before == len(PIECES) + 1


async def test_length_finish(stack: Stack, http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json=chat_body("tiny-length", max_tokens=4))
    body = response.json()
    validate(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["message"]["content"] == "abcd"


# --- completions and models ---------------------------------------------------------------------------

async def test_completion_via_openai_client(stack: Stack) -> None:
    raw = await stack.client.completions.with_raw_response.create(model="tiny-text", prompt=["Once"], max_tokens=8)
    validate(json.loads(raw.text), "CreateCompletionResponse")
    validate(stack.sent[-1], "CreateCompletionRequest")
    completion = raw.parse()
    assert completion.choices[0].text == "Hello world" and completion.choices[0].finish_reason == "stop"
    assert completion.id == f"cmpl-{raw.headers['x-request-id']}" and completion.object == "text_completion"
    assert stack.fake.calls[-1].request.prompt == "Once"

    stream = await stack.client.completions.create(model="tiny-text", prompt="Once", stream=True,
                                                   stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    validate(stack.sent[-1], "CreateCompletionRequest")
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello world"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 8
    assert chunks[-1].usage.prompt_tokens_details is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0


async def test_completion_stream_frames(stack: Stack, http: httpx.AsyncClient) -> None:
    body = {"model": "tiny-text", "prompt": "Once", "stream": True, "stream_options": {"include_usage": True}}
    validate(body, "CreateCompletionRequest")
    async with http.stream("POST", "/v1/completions", json=body) as response:
        frames = await sse(response)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    for chunk in chunks:
        validate(chunk, DERIVED_STREAM_COMPLETION)
    # The spec's own completion object fits the finish chunk once usage:null (include_usage) is left out.
    validate({k: v for k, v in chunks[-2].items() if k != "usage"}, "CreateCompletionResponse")
    assert [c["choices"][0]["text"] for c in chunks[:-2]] == PIECES
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"] == []


async def test_list_models(stack: Stack, http: httpx.AsyncClient) -> None:
    models = await stack.client.models.list()
    assert [m.id for m in models.data] == ["tiny", "tiny-text"]
    response = await http.get("/v1/models")
    validate(response.json(), "ListModelsResponse")
    assert response.json()["data"][1]["owned_by"] == "inferplane"  # empty owner gets the default
    assert [m["context_length"] for m in response.json()["data"]] == [512, 512]
    assert [m.context_length for m in models.data] == [512, 512]  # type: ignore[attr-defined]  (an extension)


async def test_healthz(stack: Stack, http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


# --- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [None, "Token abc", "Bearer", "Bearer a b"])
async def test_bad_authorization_is_refused_before_the_router(stack: Stack, authorization: str | None) -> None:
    calls = len(stack.fake.calls)
    headers = {} if authorization is None else {"authorization": authorization}
    async with httpx.AsyncClient(base_url=stack.base) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
        models = await client.get("/v1/models", headers=headers)
    error = assert_error(response, 401)
    assert error["type"] == "invalid_request_error"
    assert_error(models, 401)
    assert len(stack.fake.calls) == calls


async def test_router_unauthenticated(stack: Stack) -> None:
    async with stack.client_with_key("sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        validate(info.value.response.json(), "ErrorResponse")
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()


async def test_unknown_model(stack: Stack, http: httpx.AsyncClient) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await stack.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found" and info.value.param == "model"
    # Streaming too: the error comes before the first byte, so it is a plain JSON answer with its status.
    response = await http.post("/v1/chat/completions", json=chat_body("nope", stream=True))
    assert response.headers["content-type"] == "application/json"
    assert_error(response, 404, param="model", code="model_not_found")


@pytest.mark.parametrize(("extra", "param", "spec_allows"), [
    ({"max_tokens": -1}, "max_tokens", True),  # the spec sets no minimum on chat max_tokens; OpenAI refuses
    ({"max_tokens": 0}, "max_tokens", True),
    ({"max_completion_tokens": 0}, "max_completion_tokens", True),
    ({"n": 129}, "n", False),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", True),  # valid for OpenAI; no audio here
    ({"frobnicate": 1}, "frobnicate", True),  # the spec allows more properties; a typo is refused, not ignored
    ({"temperature": 3}, "temperature", False),
    ({"top_p": 0}, "top_p", True),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", False),
    ({"messages": []}, "messages", False),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", True),
    ({"stream_options": {"include_usage": True}}, "stream_options", True),
])
async def test_invalid_chat_parameters(stack: Stack, http: httpx.AsyncClient, extra: dict[str, Any], param: str,
                                       spec_allows: bool) -> None:
    body = chat_body(**extra)
    assert is_valid(body, "CreateChatCompletionRequest") is spec_allows
    calls = len(stack.fake.calls)
    error = assert_error(await http.post("/v1/chat/completions", json=body), 400, param=param)
    assert error["type"] == "invalid_request_error" and param in error["message"]
    assert len(stack.fake.calls) == calls


async def test_invalid_completion_parameters(stack: Stack, http: httpx.AsyncClient) -> None:
    for body, param in [({"model": "tiny-text", "prompt": "x", "max_tokens": -1}, "max_tokens"),
                        ({"model": "tiny-text", "prompt": "x", "echo": True}, "echo"),
                        ({"model": "tiny-text", "prompt": ["a", "b"]}, "prompt"),
                        ({"model": "tiny-text"}, "prompt")]:
        assert_error(await http.post("/v1/completions", json=body), 400, param=param)
    with pytest.raises(openai.BadRequestError) as info:
        await stack.client.completions.create(model="tiny-text", prompt="x", max_tokens=-1)
    assert info.value.param == "max_tokens"


async def test_unparseable_body(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", content=b"{not json",
                               headers={"content-type": "application/json"})
    assert "parse the JSON body" in assert_error(response, 400)["message"]
    assert_error(await http.post("/v1/chat/completions", json=[1]), 400)


@pytest.mark.parametrize(("model", "status", "param", "code"), [
    ("bad-param", 400, "max_tokens", None),
    ("forbidden", 403, None, None),
    ("limited", 429, None, "rate_limit_exceeded"),
    ("down", 503, None, "service_unavailable"),
    ("slow", 504, None, "timeout"),
    ("internal", 500, None, None),
])
async def test_router_status_mapping(stack: Stack, http: httpx.AsyncClient, model: str, status: int,
                                     param: str | None, code: str | None) -> None:
    response = await http.post("/v1/chat/completions", json=chat_body(model))
    error = assert_error(response, status, param=param, code=code)
    if model == "internal":
        assert "SECRET" not in error["message"] and "KeyError" not in error["message"]
        assert error["type"] == "server_error"
    if model == "limited":
        assert response.headers["retry-after"] == "7" and response.headers["x-ratelimit-limit-requests"] == "60"


@contextlib.asynccontextmanager
async def another_gateway(**settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A second in-process gateway with its own settings, and a client for it."""
    gateway = GatewayServer(GatewaySettings(port=0, **settings), handle_signals=False)
    task = asyncio.create_task(gateway.serve())
    await asyncio.wait_for(gateway.ready.wait(), 10)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}", timeout=10,
                                     headers={"authorization": f"Bearer {API_KEY}"}) as client:
            yield client
    finally:
        gateway.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_deadline_is_the_router_call_timeout(stack: Stack) -> None:
    async with another_gateway(router_addr=f"127.0.0.1:{stack.router_port}", request_timeout_s=0.3) as client:
        response = await client.post("/v1/chat/completions", json=chat_body("hang-first"),
                                     headers={"x-request-id": "dl-1"})
    assert_error(response, 504, code="timeout")
    await asyncio.wait_for(stack.fake.cancelled["dl-1"].wait(), 5)  # the deadline reached the router


async def test_router_down() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with another_gateway(router_addr=f"127.0.0.1:{port}") as client:
        assert_error(await client.post("/v1/chat/completions", json=chat_body()), 503, code="service_unavailable")
        assert_error(await client.get("/healthz"), 503)


async def test_error_mid_stream_ends_with_an_error_frame(stack: Stack, http: httpx.AsyncClient) -> None:
    async with http.stream("POST", "/v1/chat/completions", json=chat_body("broken-mid", stream=True)) as response:
        assert response.status_code == 200
        frames = await sse(response)
    assert "[DONE]" not in frames
    *chunks, last = [json.loads(f) for f in frames]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[-1]["choices"][0]["delta"] == {"content": "partial"}
    validate(last, "ErrorResponse")
    assert last["error"]["code"] == "service_unavailable"

    stream = await stack.client.chat.completions.create(model="broken-mid", messages=[{"role": "user",
                                                                                       "content": "hi"}],
                                                        stream=True)
    with pytest.raises(openai.APIError, match="overloaded"):
        async for _ in stream:
            pass


async def test_failed_finish_is_never_a_finish_reason(http: httpx.AsyncClient) -> None:
    assert_error(await http.post("/v1/chat/completions", json=chat_body("failed-finish")), 500)
    async with http.stream("POST", "/v1/chat/completions", json=chat_body("failed-finish", stream=True)) as r:
        frames = [json.loads(f) for f in await sse(r)]
    assert "error" in frames[-1] and all(c["choices"][0]["finish_reason"] is None for c in frames[:-1])


async def test_body_limit(stack: Stack, http: httpx.AsyncClient) -> None:
    big = chat_body(messages=[{"role": "user", "content": "x" * BODY_LIMIT}])
    error = assert_error(await http.post("/v1/chat/completions", json=big), 413)
    assert str(BODY_LIMIT) in error["message"]

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit counts the bytes read
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(3):
            yield b"y" * (BODY_LIMIT // 2)
        yield b'"}]}'

    response = await http.post("/v1/chat/completions", content=chunked(),
                               headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413)
    # Just under the limit is fine.
    ok = chat_body(messages=[{"role": "user", "content": "x" * (BODY_LIMIT - 200)}])
    assert (await http.post("/v1/chat/completions", json=ok)).status_code == 200


async def test_unknown_route_and_wrong_method(http: httpx.AsyncClient) -> None:
    error = assert_error(await http.post("/v1/nope", json={}), 404)
    assert error["message"] == "Invalid URL (POST /v1/nope)"
    response = await http.get("/v1/chat/completions")
    assert_error(response, 405)
    assert response.headers["allow"] == "POST"
    assert_error(await http.delete("/v1/models"), 405)


# --- request ids, tracing, cancellation ---------------------------------------------------------------

async def test_request_id_both_ways(stack: Stack, http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json=chat_body(), headers={"x-request-id": "caller-42"})
    assert response.headers["x-request-id"] == "caller-42"
    assert response.json()["id"] == "chatcmpl-caller-42"
    assert stack.fake.calls[-1].metadata["x-request-id"] == "caller-42"

    response = await http.post("/v1/chat/completions", json=chat_body())
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert stack.fake.calls[-1].metadata["x-request-id"] == response.headers["x-request-id"]

    async with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True),
                           headers={"x-request-id": "caller-43"}) as streamed:
        await sse(streamed)
    assert streamed.headers["x-request-id"] == "caller-43"
    assert_error(await http.post("/v1/chat/completions", json=chat_body(), headers={"x-request-id": "a b"}), 400,
                 param="x-request-id")
    assert (await http.get("/v1/nope", headers={"x-request-id": "caller-44"})).headers["x-request-id"] == "caller-44"


async def test_trace_context_flows_to_the_router(stack: Stack, http: httpx.AsyncClient) -> None:
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    response = await http.post("/v1/chat/completions", json=chat_body(),
                               headers={"traceparent": f"00-{trace_id}-{parent}-01", "x-request-id": "traced-1"})
    assert response.status_code == 200
    assert stack.fake.calls[-1].metadata["traceparent"].split("-")[1] == trace_id

    def server_span() -> Any:
        return next((s for s in stack.spans.get_finished_spans()
                     if (s.attributes or {}).get("inferplane.request_id") == "traced-1"), None)

    await eventually(lambda: server_span() is not None)
    span = server_span()
    assert span.kind.name == "SERVER" and span.name == "POST /v1/chat/completions"
    assert format(span.context.trace_id, "032x") == trace_id and format(span.parent.span_id, "016x") == parent
    assert span.attributes["http.route"] == "/v1/chat/completions"
    assert span.attributes["http.response.status_code"] == 200


async def test_stream_disconnect_cancels_the_router_call(stack: Stack, http: httpx.AsyncClient) -> None:
    async with http.stream("POST", "/v1/chat/completions", json=chat_body("hang", stream=True),
                           headers={"x-request-id": "gone-1"}) as response:
        async for line in response.aiter_lines():
            if '"first"' in line:
                break  # leaving the block closes the connection mid-stream
    await asyncio.wait_for(stack.fake.cancelled["gone-1"].wait(), 5)


async def test_non_stream_disconnect_cancels_the_router_call(stack: Stack, http: httpx.AsyncClient) -> None:
    request = asyncio.create_task(http.post("/v1/chat/completions", json=chat_body("hang"),
                                            headers={"x-request-id": "gone-2"}))
    await asyncio.wait_for(stack.fake.started["gone-2"].wait(), 5)
    request.cancel()  # the client gives up: its connection closes
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait_for(stack.fake.cancelled["gone-2"].wait(), 5)


# --- settings and the process -------------------------------------------------------------------------

def test_settings_from_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "stack.yaml"
    config.write_text(yaml.safe_dump({"gateway": {"port": 9001, "router_addr": "10.0.0.1:1"}}))
    monkeypatch.setenv("INFERPLANE_GATEWAY_ROUTER_ADDR", "10.0.0.2:2")
    monkeypatch.setenv("INFERPLANE_GATEWAY_TELEMETRY__EXPORTER", "console")
    settings = load_settings(GatewaySettings, config_file=config, section="gateway")
    assert settings.port == 9001 and settings.router_addr == "10.0.0.2:2"
    assert settings.telemetry.exporter == "console" and settings.max_body_bytes == 1024 * 1024


async def test_process_drains_in_flight_stream_on_sigterm(stack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "stack.yaml"
    config.write_text(yaml.safe_dump({"gateway": {"router_addr": f"127.0.0.1:{stack.router_port}",
                                                  "grace_seconds": 10}}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "inferplane.gateway", "--config", str(config), "--port", "0", cwd=ROOT,
        env={**os.environ, "INFERPLANE_LOG_LEVEL": "INFO"}, stderr=asyncio.subprocess.PIPE)
    try:
        port = await asyncio.wait_for(_listening_port(proc), 30)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10,
                                     headers={"authorization": f"Bearer {API_KEY}", "x-request-id": "drain-1"}
                                     ) as client:
            assert (await client.get("/healthz")).status_code == 200
            async with client.stream("POST", "/v1/chat/completions", json=chat_body("gated", stream=True)) as r:
                lines = r.aiter_lines()
                await _until(lines, '"before"')
                proc.send_signal(signal.SIGTERM)
                stack.fake.gates["drain-1"].set()
                rest = [line async for line in lines]
        assert "data: [DONE]" in rest and any('" after"' in line for line in rest)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _listening_port(proc: asyncio.subprocess.Process) -> int:
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        match = re.search(r"gateway listening on [\d.]+:(\d+)", line.decode())
        if match:
            return int(match.group(1))
    raise AssertionError(f"gateway exited with {await proc.wait()} before listening")


async def _until(lines: AsyncIterator[str], needle: str) -> None:
    async for line in lines:
        if needle in line:
            return
    raise AssertionError(f"stream ended before {needle!r}")

