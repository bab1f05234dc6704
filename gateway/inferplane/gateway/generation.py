"""``POST /v1/chat/completions`` and ``/v1/completions`` as one raw ASGI endpoint: the token path's last hop.

``EdgeMiddleware`` calls ``GenerationEndpoint`` directly (no routing, no ``StreamingResponse``, no exception
middleware wrapping every ``send``). A stream writes each router message as one SSE frame with one ``send`` (the
opening chunks go out with the first text), and the end (last text, finish, usage, ``[DONE]``) in one ``send`` that
also ends the response; with ``n`` choices their messages interleave, tagged with ``index``. An error before the
first byte is a plain JSON error with its status; after it, one ``data: {"error": ...}`` frame. A caller that
disconnects cancels the router call at once (a watcher task per request, not per message), which cancels the
executor and records the tokens generated.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from contextlib import aclosing
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from prometheus_client import Counter
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive, Scope, Send

from inferplane.common import wire
from inferplane.gateway.auth import key_metadata
from inferplane.gateway.disconnect import client_gone
from inferplane.gateway.errors import (
    CLIENT_CLOSED_REQUEST,
    INTERNAL_MESSAGE,
    SERVER_ERROR,
    GatewayError,
    forwarded_headers,
    from_validation_error,
)
from inferplane.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    ResponseEncoder,
    finish_reason,
    sse_frame,
    usage_dict,
)
from inferplane.gateway.upstream import GenerateCall, RouterApi
from inferplane.v1 import router_pb2

log = logging.getLogger(__name__)

SESSION_ID_HEADER = "x-session-id"
MAX_SESSION_ID = 256
SSE_WRITES = Counter("inferplane_gateway_sse_writes", "SSE body writes (one send each) of streamed completions")
DONE_FRAME = b"data: [DONE]\n\n"
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
# The two generation routes, by path: the request model of each.
GENERATION_ROUTES: dict[str, type[GenerationRequest]] = {"/v1/chat/completions": ChatCompletionRequest,
                                                         "/v1/completions": CompletionRequest}


class ClientGone(Exception):
    """The caller disconnected (while its body was read, or during the answer)."""


ParsedT = TypeVar("ParsedT", bound=BaseModel)


async def parse_body(request: Request, model: type[ParsedT]) -> ParsedT:
    """The request's JSON body as ``model`` (the edge middleware's receive enforces the byte limit): a client that
    left is ``client_gone``, an invalid body an OpenAI-shaped 400 naming the field."""
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise client_gone() from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def session_id(headers: Headers) -> str:
    """The ``x-session-id`` header (session affinity: its requests keep to one executor replica); "" without one,
    a 400 naming it when longer than ``MAX_SESSION_ID`` characters."""
    value = headers.get(SESSION_ID_HEADER, "")
    if len(value) > MAX_SESSION_ID:
        raise GatewayError(400, f"Invalid '{SESSION_ID_HEADER}': at most {MAX_SESSION_ID} characters.",
                           param=SESSION_ID_HEADER)
    return value


def _no_finish() -> GatewayError:
    return GatewayError(500, "The generation ended without a finish reason.", type=SERVER_ERROR)


def json_bytes(content: Any) -> bytes:
    """As Starlette's ``JSONResponse`` renders its content."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


def _raw_headers(request_id: str, headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [*((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
            (wire.REQUEST_ID.encode(), request_id.encode())]


async def read_body(receive: Receive) -> bytes:
    """The whole request body (the middleware's ``receive`` enforces the byte limit)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class _Answer:
    """One request's answer: what has been sent, and the send itself."""

    __slots__ = ("request_id", "send", "started", "status")

    def __init__(self, send: Send, request_id: str) -> None:
        self.send = send
        self.request_id = request_id
        self.started = False
        self.status = 500

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started, self.status = True, status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def json(self, status: int, content: Any, headers: dict[str, str]) -> None:
        body = json_bytes(content)
        await self.start(status, [(b"content-length", str(len(body)).encode()),
                                  (b"content-type", b"application/json"),
                                  *_raw_headers(self.request_id, headers)])
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def error(self, err: GatewayError) -> None:
        await self.json(err.status, err.body(), err.headers)


class GenerationEndpoint:
    """The ASGI endpoint of the generation routes (``router``: the ``RouterApi``, set by the app's lifespan)."""

    def __init__(self, router: Callable[[], RouterApi]) -> None:
        self._router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Answer one request; return its HTTP status. Nothing raises out of here but the task's cancellation."""
        answer = _Answer(send, scope["state"]["request_id"])
        call: GenerateCall | None = None
        try:
            call = await self._open(scope, receive, answer)
        except ClientGone:
            if not answer.started:
                answer.status = CLIENT_CLOSED_REQUEST
        except GatewayError as err:
            await answer.error(err)
        except StarletteHTTPException as exc:  # the body limit, raised from the middleware's receive
            await answer.error(GatewayError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})))
        except Exception:
            log.exception("unhandled error in POST %s", scope["path"])
            if not answer.started:
                await answer.error(GatewayError(500, INTERNAL_MESSAGE, type=SERVER_ERROR))
        finally:
            if call is not None:
                await call.close()  # cancels the router call unless it finished
        return answer.status

    async def _open(self, scope: Scope, receive: Receive, answer: _Answer) -> GenerateCall | None:
        headers = Headers(scope=scope)
        metadata = (*key_metadata(headers), (wire.REQUEST_ID, answer.request_id))
        raw = await read_body(receive)
        try:
            body = GENERATION_ROUTES[scope["path"]].model_validate_json(raw)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        req = body.to_generate_request()
        req.session_id = session_id(headers)
        call = self._router().generate(req, metadata=metadata)
        try:
            await _until_gone(receive, self._answer(call, body, answer))
        except BaseException:
            await call.close()
            raise
        return call

    async def _answer(self, call: GenerateCall, body: GenerationRequest, answer: _Answer) -> None:
        first = await call.first()
        headers = forwarded_headers(await call.initial_metadata())
        enc = body.make_encoder(first)
        if body.stream:
            await _stream(call, first, enc, answer, headers)
            return
        completion = await _complete(call, first, enc)
        cost = (completion.get("usage") or {}).get("cost")
        if cost is not None:
            headers["x-inferplane-cost"] = cost  # exact USD, as usage.cost (a stream has it in its usage chunk)
        await answer.json(200, completion, headers)


async def _until_gone(receive: Receive, work: Any) -> None:
    """Run ``work`` in this task; a caller that disconnects first cancels it (``ClientGone``)."""
    task = asyncio.current_task()
    assert task is not None, "an ASGI app runs in a task"

    async def watch() -> None:
        message: Message = {"type": ""}
        while message["type"] != "http.disconnect":
            message = await receive()
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled() and task.uncancel() == 0:
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


async def _complete(call: GenerateCall, first: router_pb2.GenerateResponse, enc: ResponseEncoder) -> dict[str, Any]:
    """The whole answer: every choice's messages kept until the last choice's finish (which has the usage)."""
    usage: dict[str, Any] | None = None
    msg: router_pb2.GenerateResponse | None = first
    async with aclosing(call.messages()) as messages:
        while msg is not None:
            if not enc.done:  # nothing counts after the last finish; read on to the call's status
                enc.add(msg, finish_reason(msg))
                usage = usage_dict(msg) or usage
            msg = await anext(messages, None)
    if not enc.done:
        raise _no_finish()
    return enc.body(usage)


async def _stream(call: GenerateCall, first: router_pb2.GenerateResponse, enc: ResponseEncoder, answer: _Answer,
                  headers: dict[str, str]) -> None:
    """SSE frames; an error after the first byte ends the stream with one ``data: {"error": ...}`` frame.

    The choices' messages interleave; each choice's finish chunk follows its last text, and the usage chunk and
    ``[DONE]`` follow the last choice's finish (n = 1: one message, one send, as before)."""
    await answer.start(200, [*SSE_HEADERS, *_raw_headers(answer.request_id, headers)])
    send = answer.send
    writes = 0  # counted into SSE_WRITES once, at the end (not a lock per token)
    # Frames not sent yet: the opening chunks go out with the first text; an error frame goes after them.
    pending = b"".join(sse_frame(chunk) for chunk in enc.opening())
    try:
        async with aclosing(call.messages()) as messages:
            msg: router_pb2.GenerateResponse | None = first
            while msg is not None:
                pending += enc.frames(msg)
                finish = finish_reason(msg)
                enc.add_finish(msg, finish)
                if finish is not None:
                    pending += sse_frame(enc.finish_chunk(finish, msg.index))
                if enc.done:  # the end: last text, finish, usage and [DONE] in one send
                    usage = sse_frame(enc.usage_chunk(usage_dict(msg))) if enc.include_usage else b""
                    async for _ in messages:
                        pass  # nothing counts after the last finish message; read on to the call's status
                    writes += 1
                    await send({"type": "http.response.body", "body": pending + usage + DONE_FRAME,
                                "more_body": False})
                    return
                if pending:
                    writes += 1
                    await send({"type": "http.response.body", "body": pending, "more_body": True})
                    pending = b""
                msg = await anext(messages, None)
        raise _no_finish()
    except GatewayError as err:
        span = trace.get_current_span()
        span.set_attribute("inferplane.stream_error", err.code or err.type)
        if err.status >= 500:
            span.set_status(Status(StatusCode.ERROR, err.message))
        writes += 1
        await send({"type": "http.response.body", "body": pending + sse_frame(err.body()), "more_body": False})
    finally:
        SSE_WRITES.inc(writes)
