"""Typed error details end to end: domain errors raised in a real ``GrpcServer`` (the one interceptor chain every
service runs) arrive as a status, a ``google.rpc.Status`` with an ``ErrorInfo`` in ``grpc-status-details-bin``
(read here with ``grpc_status.rpc_status``, as a gRPC caller would) and the older trailers; the gateway maps them
into OpenAI's bodies by reason first.

The servicer raises what the test's model name asks for: the test is about the error path, not about what the
router decides (the router's own tests cover that), so the raises are written as the services write them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from inferplane.common import wire
from inferplane.common.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable
from inferplane.common.money import PriceNanos
from inferplane.common.server import GrpcServer, caller_key
from inferplane.common.settings import ServerSettings
from inferplane.gateway.main import GatewayServer, GatewaySettings
from inferplane.metering.main import MeteringSettings, build_server
from inferplane.metering.store import MeteringStore
from inferplane.router.admission import AdmissionRefused
from inferplane.router.capacity import Overloaded
from inferplane.v1 import common_pb2, metering_pb2, metering_pb2_grpc, router_pb2, router_pb2_grpc
from tests.openai_schema import validate

KEY = "sk-test-details"
BEARER = wire.bearer_metadata(KEY)
RAISES: dict[str, Callable[[], BaseException]] = {
    "missing-model": lambda: NotFound("The model `missing-model` does not exist or you do not have access to it.",
                                      param="model"),
    "missing-key-id": lambda: NotFound("no API key with id 'k1'", param="key_id"),
    "too-long": lambda: InvalidArgument("The prompt and max_tokens exceed the model's context length of 512.",
                                        param="messages", reason=wire.REASON_CONTEXT_LENGTH_EXCEEDED),
    "bad-param": lambda: InvalidArgument("'top_p' must be greater than 0 and at most 1.", param="top_p"),
    # as router/admission.py raises them
    "budget": lambda: AdmissionRefused("You exceeded your current quota.", reason=wire.REASON_INSUFFICIENT_QUOTA,
                                       metadata=(("x-ratelimit-limit-requests", "5"),)),
    "rate": lambda: AdmissionRefused("Rate limit reached for requests per minute (limit 2).",
                                     reason=wire.REASON_RATE_LIMITED,
                                     metadata=(("retry-after", "30"), ("x-ratelimit-limit-requests", "2"))),
    "overloaded": lambda: Overloaded("The model `overloaded` is overloaded.", retry_after_s=1.5),
    "denied": lambda: PermissionDenied("This API key may not use the model `denied`.", param="model"),
    "down": lambda: Unavailable("no executor is available for model 'down'; retry later"),
    "slow": lambda: TimeoutError(),
    "bug": lambda: KeyError("SECRET"),
}


@dataclass(frozen=True)
class Expect:
    code: grpc.StatusCode
    reason: str
    param: str | None
    http: int
    openai_code: str | None
    trailers: tuple[tuple[str, str], ...] = ()


EXPECT: dict[str, Expect] = {
    "missing-model": Expect(grpc.StatusCode.NOT_FOUND, "ERROR_REASON_MODEL_NOT_FOUND", "model", 404, "model_not_found"),
    # NOT_FOUND of something else is not "model_not_found": the reason says so, not the status
    "missing-key-id": Expect(grpc.StatusCode.NOT_FOUND, "ERROR_REASON_NOT_FOUND", "key_id", 404, None),
    "too-long": Expect(grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_CONTEXT_LENGTH_EXCEEDED", "messages", 400,
                       "context_length_exceeded"),
    "bad-param": Expect(grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", "top_p", 400, None),
    "budget": Expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_INSUFFICIENT_QUOTA", None, 429,
                     "insufficient_quota", ((wire.ERROR_CODE, "insufficient_quota"),
                                            ("x-ratelimit-limit-requests", "5"))),
    "rate": Expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_RATE_LIMITED", None, 429, "rate_limit_exceeded",
                   (("retry-after", "30"), ("x-ratelimit-limit-requests", "2"))),
    "overloaded": Expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_OVERLOADED", None, 503, "overloaded",
                         ((wire.ERROR_CODE, "overloaded"), ("retry-after", "2"))),
    "denied": Expect(grpc.StatusCode.PERMISSION_DENIED, "ERROR_REASON_PERMISSION_DENIED", "model", 403,
                     "insufficient_permissions"),
    "down": Expect(grpc.StatusCode.UNAVAILABLE, "ERROR_REASON_UNAVAILABLE", None, 503, "service_unavailable"),
    "slow": Expect(grpc.StatusCode.DEADLINE_EXCEEDED, "ERROR_REASON_TIMEOUT", None, 504, "timeout"),
    "bug": Expect(grpc.StatusCode.INTERNAL, "ERROR_REASON_INTERNAL", None, 500, None),
    # a downstream service's error passes through the router with its reason and param
    "passthrough": Expect(grpc.StatusCode.NOT_FOUND, "ERROR_REASON_MODEL_NOT_FOUND", "model", 404,
                          "model_not_found"),
}


class RaisingRouter(router_pb2_grpc.RouterServiceServicer):
    """Authenticates as the router does, sets its x-request-id trailer, then raises what the model names."""

    def __init__(self) -> None:
        self.downstream: router_pb2_grpc.RouterServiceStub | None = None

    async def _fail(self, model: str, context: grpc.aio.ServicerContext) -> None:
        context.set_trailing_metadata(((wire.REQUEST_ID, "rid-1"),))
        caller_key(context.invocation_metadata())
        if model == "passthrough":
            assert self.downstream is not None
            await self.downstream.Embed(router_pb2.EmbedRequest(model="missing-model", inputs=["x"]),
                                        metadata=BEARER, timeout=5)
        raise RAISES[model]()

    async def Generate(self, request: router_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb2.GenerateResponse]:
        if request.model == "mid-stream":
            yield router_pb2.GenerateResponse(request_id="rid-1", text="partial", token_count=1, model="mid-stream")
            raise Unavailable("the executor ended the stream before the generation finished")
        await self._fail(request.model, context)
        yield router_pb2.GenerateResponse()  # unreachable: _fail raises

    async def Embed(self, request: router_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> router_pb2.EmbedResponse:
        await self._fail(request.model, context)
        raise AssertionError("unreachable")


@dataclass
class Stack:
    router: router_pb2_grpc.RouterServiceStub
    http: httpx.AsyncClient


async def _serve(servicer: RaisingRouter) -> GrpcServer:
    server = GrpcServer(ServerSettings(port=0, grace_seconds=0), service_names=["inferplane.v1.RouterService"],
                        register=lambda s: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, s))
    await server.start()
    return server


@pytest_asyncio.fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    downstream_servicer, servicer = RaisingRouter(), RaisingRouter()
    downstream = await _serve(downstream_servicer)
    server = await _serve(servicer)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    downstream_channel = grpc.aio.insecure_channel(f"127.0.0.1:{downstream.port}")
    servicer.downstream = router_pb2_grpc.RouterServiceStub(downstream_channel)
    gateway = GatewayServer(GatewaySettings(port=0, router_addr=f"127.0.0.1:{server.port}", request_timeout_s=30,
                                            grace_seconds=1), handle_signals=False)
    task = asyncio.create_task(gateway.serve())
    await asyncio.wait_for(gateway.ready.wait(), 10)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}", timeout=10,
                                     headers={"authorization": f"Bearer {KEY}"}) as http:
            yield Stack(router_pb2_grpc.RouterServiceStub(channel), http)
    finally:
        gateway.should_exit = True
        await asyncio.wait_for(task, 10)
        await channel.close(None)
        await downstream_channel.close(None)
        await server.stop(0)
        await downstream.stop(0)


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of a failed call, read with grpcio-status (which also checks that the Status's code and
    message are the call's)."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]  # AioRpcError has the sync call's accessors
    assert status is not None, "no grpc-status-details-bin"
    [detail] = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    return info


def assert_typed(err: grpc.aio.AioRpcError, expect: Expect) -> None:
    assert err.code() == expect.code, err
    info = error_info(err)
    assert (info.domain, info.reason) == ("inferplane.dev", expect.reason)
    assert common_pb2.ErrorReason.Value(info.reason) != common_pb2.ERROR_REASON_UNSPECIFIED
    assert dict(info.metadata) == ({"param": expect.param} if expect.param else {})
    trailers = [(k, v) for k, v in err.trailing_metadata() or () if not k.endswith("-bin")]
    for pair in expect.trailers:
        assert pair in trailers, (pair, trailers)
    assert (wire.PARAM, expect.param) in trailers if expect.param else all(k != wire.PARAM for k, _ in trailers)
    assert [k for k, _ in trailers].count(wire.ERROR_CODE) <= 1


@pytest.mark.parametrize("model", sorted(EXPECT))
async def test_grpc_callers_read_the_reason_unary_and_streaming(stack: Stack, model: str) -> None:
    expect = EXPECT[model]
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stack.router.Embed(router_pb2.EmbedRequest(model=model, inputs=["x"]), metadata=BEARER, timeout=5)
    assert_typed(unary.value, expect)
    call = stack.router.Generate(router_pb2.GenerateRequest(model=model, prompt="x"), metadata=BEARER, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for _ in call:
            pass
    assert_typed(streamed.value, expect)
    # the handler's own trailer (the router's x-request-id) is not lost to the error's
    assert (wire.REQUEST_ID, "rid-1") in tuple(streamed.value.trailing_metadata() or ())
    if model == "bug":
        assert "SECRET" not in (streamed.value.details() or "")


@pytest.mark.parametrize(("metadata", "message"), [((), wire.MISSING_KEY),
                                                   (((wire.AUTHORIZATION, "Bearer a b"),), wire.MALFORMED_KEY),
                                                   (((wire.AUTHORIZATION, "Basic abc"),), wire.MALFORMED_KEY)])
async def test_a_missing_or_malformed_key_is_invalid_api_key(stack: Stack, metadata: tuple[tuple[str, str], ...],
                                                             message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.router.Embed(router_pb2.EmbedRequest(model="bad-param", inputs=["x"]), metadata=metadata,
                                 timeout=5)
    assert err.value.details() == message
    assert_typed(err.value, Expect(grpc.StatusCode.UNAUTHENTICATED, "ERROR_REASON_INVALID_API_KEY", None, 401,
                                   "invalid_api_key"))


@pytest.mark.parametrize("model", sorted(EXPECT))
async def test_the_gateway_answers_by_reason(stack: Stack, model: str) -> None:
    expect = EXPECT[model]
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    for response in (await stack.http.post("/v1/chat/completions", json=chat),
                     await stack.http.post("/v1/chat/completions", json={**chat, "stream": True}),
                     await stack.http.post("/v1/embeddings", json={"model": model, "input": "hi"})):
        assert response.status_code == expect.http, response.text
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        validate(body, "ErrorResponse")
        assert (body["error"]["code"], body["error"]["param"]) == (expect.openai_code, expect.param)
        for key, value in expect.trailers:
            if key.startswith(("retry-after", "x-ratelimit-")):
                assert response.headers[key] == value
        if model == "bug":
            assert "SECRET" not in response.text


async def test_an_error_after_the_first_token_keeps_its_reason(stack: Stack) -> None:
    call = stack.router.Generate(router_pb2.GenerateRequest(model="mid-stream", prompt="x"), metadata=BEARER,
                                 timeout=5)
    texts = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for msg in call:
            texts.append(msg.text)
    assert texts == ["partial"]
    assert_typed(err.value, EXPECT["down"])
    async with stack.http.stream("POST", "/v1/chat/completions", json={
            "model": "mid-stream", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as response:
        assert response.status_code == 200
        frames = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert '"code": "service_unavailable"' in frames[-1] or '"code":"service_unavailable"' in frames[-1]


async def test_metering_sends_reasons_too(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'metering.db'}"
    store = MeteringStore(url, b"details-test-secret-0123456789ab")
    store.migrate()
    admin = store.create_key("ops", scopes=["admin"])[1]
    spender = store.create_key("spender")[0]
    store.set_price("m", PriceNanos(1_000_000_000, 1_000_000_000))  # $1 per million tokens, in and out
    store.set_budget(wire.SCOPE_KEY, spender.key_id, 1_000)  # one micro-dollar
    server = build_server(MeteringSettings(server=ServerSettings(port=0, grace_seconds=0), database_url=url,
                                           secret_file=tmp_path / "secret", catalog=None), store=store)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = metering_pb2_grpc.MeteringServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.WhoAmI(metering_pb2.WhoAmIRequest(), timeout=5)
            assert missing.value.details() == wire.MISSING_KEY  # one text, OpenAI's, in every process
            assert_typed(missing.value, Expect(grpc.StatusCode.UNAUTHENTICATED, "ERROR_REASON_INVALID_API_KEY",
                                               None, 401, "invalid_api_key"))
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.RevokeKey(metering_pb2.RevokeKeyRequest(key_id="nope"),
                                     metadata=wire.bearer_metadata(admin), timeout=5)
            assert_typed(unknown.value, EXPECT["missing-key-id"])
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await stub.Reserve(metering_pb2.ReserveRequest(reservation_id="r1", key_id=spender.key_id, model="m",
                                                               prompt_tokens=1_000, max_tokens=1_000), timeout=5)
            quota = Expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_INSUFFICIENT_QUOTA", None, 429,
                           "insufficient_quota", ((wire.ERROR_CODE, "insufficient_quota"),))
            assert_typed(over.value, quota)  # metering's budget refusal says so itself
    finally:
        await server.stop(0)
        store.close()
