"""Anthropic's Messages API (``POST /v1/messages``) on the router's ``Generate``, as the chat route uses it.

The request model converts itself to the same ``GenerateRequest`` a chat completion sends (the system prompt
first, then the turns), so admission, rate limits and metering are the chat route's. Anthropic's shapes differ
from OpenAI's in three places, all here: the ``message`` object and its SSE events (``message_start`` …
``message_stop``), errors (``{"type": "error", "error": {"type", "message"}}`` with Anthropic's statuses, mapped
from the same ``GatewayError`` the OpenAI routes answer), and the key (``x-api-key`` as well as ``Authorization``).

Every field is honoured or refused with a 400 naming it: unknown fields, tools, thinking, non-text blocks and a
final assistant turn (prefill) are refused, never dropped.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Annotated, Any, Literal, TypeVar

import pydantic_core
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from inferplane.common import wire
from inferplane.common.money import format_usd
from inferplane.gateway.auth import key_metadata
from inferplane.gateway.disconnect import client_gone, unless_gone
from inferplane.gateway.errors import GatewayError, forwarded_headers
from inferplane.gateway.protocol import MAX_STOP_SEQUENCES, finish_reason
from inferplane.gateway.upstream import GenerateCall, RouterApi
from inferplane.v1 import router_pb2

API_KEY_HEADER = "x-api-key"
MISSING_KEY = "x-api-key header is required"
INVALID_KEY = "invalid x-api-key"
INT32_MAX = 2**31 - 1
# Anthropic's status and error type for each status the gateway's errors carry (other 5xx: 500 api_error).
ERROR_TYPES: dict[int, tuple[int, str]] = {
    400: (400, "invalid_request_error"),
    401: (401, "authentication_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    413: (413, "request_too_large"),
    429: (429, "rate_limit_error"),
    500: (500, "api_error"),
    503: (529, "overloaded_error"),  # capacity: Anthropic's 529, which its SDK retries
    504: (504, "timeout_error"),
}
# Fields of Anthropic's API this server does not implement: refused with a reason, not dropped.
UNSUPPORTED_FIELDS = frozenset({"tools", "tool_choice", "thinking", "service_tier", "container", "mcp_servers",
                                "context_management", "output_config", "output_format", "diagnostics",
                                "inference_geo", "speed", "user_profile_id", "workspace_id"})
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
STOP_REASONS = {wire.LENGTH: "max_tokens"}  # wire.STOP: "end_turn" or "stop_sequence"

ConversationT = TypeVar("ConversationT", bound="Conversation")


# --- errors -----------------------------------------------------------------------------------------------

def error_body(err: GatewayError) -> tuple[int, dict[str, Any]]:
    """Anthropic's status and body for one of the gateway's errors."""
    status, kind = ERROR_TYPES.get(err.status) or (
        (500, "api_error") if err.status >= 500 else (err.status, "invalid_request_error"))  # 405, 499 (gone)
    return status, {"type": "error", "error": {"type": kind, "message": err.message}}


def error_response(err: GatewayError) -> JSONResponse:
    status, body = error_body(err)
    return JSONResponse(body, status_code=status, headers=err.headers)


def invalid(message: str) -> GatewayError:
    return GatewayError(400, message)


def _dotted(loc: Any) -> str:
    """``("messages", 0, "content")`` → ``messages.0.content`` (Anthropic's spelling of a nested field); the
    names pydantic gives union members (``str``, ``list[TextBlockParam]``) are no fields and are left out."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and (p == "str" or "[" in p))) or "body"


def from_validation(exc: ValidationError) -> GatewayError:
    errors = exc.errors()
    # The first field's deepest error: a union (string or blocks) reports one error per member, and the one
    # inside the blocks says more than "Input should be a valid string".
    first = max((e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]), key=lambda e: len(e["loc"]))
    where = _dotted(first["loc"])
    if first["type"] == "missing":
        return invalid(f"{where}: Field required")
    if first["type"] == "extra_forbidden":
        return invalid(f"{where}: Extra inputs are not permitted")
    return invalid(f"{where}: {str(first['msg']).removeprefix('Value error, ')}")


# --- request ----------------------------------------------------------------------------------------------

def _text_blocks(value: Any) -> Any:
    """Content is a string or a list of ``text`` blocks; any other block type is refused by name."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("expected a string or a list of content blocks")
    for block in value:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            raise ValueError(f"content blocks of type {kind!r} are not supported (only 'text')")
    return value


class TextBlockParam(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str
    # A prompt-cache hint: accepted, no effect (there is no prompt cache; the answer is the same either way).
    cache_control: dict[str, Any] | None = None
    citations: None = None  # a returned block may carry null citations; citations themselves are refused


Content = Annotated[str | list[TextBlockParam], BeforeValidator(_text_blocks)]


def _joined(content: str | list[TextBlockParam]) -> str:
    return content if isinstance(content, str) else "".join(b.text for b in content)


class MessageParam(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: Content


class Metadata(BaseModel):
    """Accepted and unused: ``user_id`` goes nowhere (as OpenAI's ``user`` on the chat route)."""

    model_config = ConfigDict(extra="forbid")

    user_id: str | None = None


class Conversation(BaseModel):
    """What ``/v1/messages`` and ``/v1/messages/count_tokens`` share: the model and the chat."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: Content | None = None
    # Top-level prompt-cache hint: accepted, no effect (as on a text block).
    cache_control: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages: list[MessageParam]) -> list[MessageParam]:
        if messages[-1].role != "user":
            # Anthropic continues a final assistant turn (prefill); the chat template would close it instead.
            raise ValueError("the last message must have role 'user' (assistant prefill is not supported)")
        return messages

    def chat(self) -> router_pb2.ChatInput:
        """The system prompt first, then the turns: the messages a chat completion would send."""
        chat = router_pb2.ChatInput()
        if self.system is not None:
            chat.messages.add(role="system", content=_joined(self.system))
        for m in self.messages:
            chat.messages.add(role=m.role, content=_joined(m.content))
        return chat


class CountTokensRequest(Conversation):
    """``POST /v1/messages/count_tokens``."""

    def to_pb(self) -> router_pb2.CountTokensRequest:
        return router_pb2.CountTokensRequest(model=self.model, chat=self.chat())


class MessagesRequest(Conversation):
    """``POST /v1/messages``."""

    max_tokens: int = Field(ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT32_MAX)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    stream: bool = False
    metadata: Metadata | None = None

    def to_generate_request(self) -> router_pb2.GenerateRequest:
        req = router_pb2.GenerateRequest(model=self.model, chat=self.chat(), max_tokens=self.max_tokens,
                                         stop=self.stop_sequences or [], include_usage=True)
        for name in ("temperature", "top_p", "top_k"):
            value = getattr(self, name)
            if value is not None:
                setattr(req.sampling, name, value)
        return req


def parse_request(raw: bytes, model: type[ConversationT]) -> ConversationT:
    """The request, or a 400 naming the field: refused features and unknown fields before anything else."""
    try:
        # pydantic's parser: a lone surrogate escape (which no protobuf string holds) and NaN are invalid JSON here,
        # not a 500 when the request is built (found by the fuzz of every route's body)
        data = pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError:
        raise invalid("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.")
    for name in data:
        if name in UNSUPPORTED_FIELDS:
            raise invalid(f"{name}: not supported by this server")
        if name not in model.model_fields:
            raise invalid(f"{name}: Extra inputs are not permitted")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from None


def caller_metadata(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The key from ``x-api-key`` (Anthropic's clients) or else ``Authorization: Bearer``; 401 without one."""
    value = headers.get(API_KEY_HEADER)
    if value is None:
        if headers.get(wire.AUTHORIZATION) is None:
            raise GatewayError(401, MISSING_KEY)
        return key_metadata(headers)
    key = value.strip()
    if not key or any(c.isspace() for c in key):
        raise GatewayError(401, INVALID_KEY)
    return wire.bearer_metadata(key)


# --- response ---------------------------------------------------------------------------------------------

class MessageEncoder:
    """One request's ``message`` object and stream events; id and model from the router's first message."""

    def __init__(self, first: router_pb2.GenerateResponse) -> None:
        self.id = f"msg_{first.request_id}"
        self.model = first.model

    def stop(self, msg: router_pb2.GenerateResponse, finish: str) -> tuple[str, str | None]:
        """Anthropic's ``stop_reason`` and ``stop_sequence`` of the final message."""
        if finish != wire.STOP:
            return STOP_REASONS.get(finish, "end_turn"), None
        matched = msg.stop_sequence if msg.HasField("stop_sequence") else None
        return ("stop_sequence", matched) if matched else ("end_turn", None)

    def envelope(self, text: str | None, stop: tuple[str | None, str | None], usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [] if text is None else [{"type": "text", "text": text}],
                "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}

    def opening(self) -> bytes:
        start = self.envelope(None, (None, None), {"input_tokens": 0, "output_tokens": 0})
        return (event("message_start", {"type": "message_start", "message": start})
                + event("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}})
                + event("ping", {"type": "ping"}))

    def delta(self, text: str) -> bytes:
        return event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": text}})

    def closing(self, stop: tuple[str, str | None], usage: dict[str, int]) -> bytes:
        return (event("content_block_stop", {"type": "content_block_stop", "index": 0})
                + event("message_delta", {"type": "message_delta",
                                          "delta": {"stop_reason": stop[0], "stop_sequence": stop[1]},
                                          "usage": usage})
                + event("message_stop", {"type": "message_stop"}))


def event(kind: str, data: dict[str, Any]) -> bytes:
    """One server-sent event as Anthropic names them: ``event: <type>`` and its JSON."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {kind}\ndata: {body}\n\n".encode()


def usage_of(msg: router_pb2.GenerateResponse) -> dict[str, int]:
    """Anthropic's usage: ``input_tokens`` counts the prompt tokens computed; those the model reused from its prefix
    cache are ``cache_read_input_tokens`` (present when there were some), as Anthropic splits a cached prompt."""
    u = msg.usage
    if u.cached_tokens:
        return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
                "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}
    return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens}


def cost_headers(msg: router_pb2.GenerateResponse) -> dict[str, str]:
    return {"x-inferplane-cost": format_usd(msg.usage.cost_nanodollars)} if msg.usage.HasField(
        "cost_nanodollars") else {}


async def _until_final(call: GenerateCall, msg: router_pb2.GenerateResponse) -> AsyncIterator[
        tuple[router_pb2.GenerateResponse, str | None]]:
    """Each message with its finish (None until the last), then reads the call out to its status."""
    messages = call.messages()
    try:
        while True:
            finish = finish_reason(msg)
            yield msg, finish
            if finish is not None:
                async for _ in messages:
                    pass  # nothing counts after the finish message
                return
            next_msg = await anext(messages, None)
            if next_msg is None:
                raise GatewayError(500, "The generation ended without a finish reason.", type="server_error")
            msg = next_msg
    finally:
        await messages.aclose()


async def _message(call: GenerateCall, first: router_pb2.GenerateResponse, enc: MessageEncoder,
                   headers: dict[str, str]) -> JSONResponse:
    parts: list[str] = []
    end: tuple[router_pb2.GenerateResponse, str] | None = None
    async for msg, finish in _until_final(call, first):  # to the call's end: its status is read too
        parts.append(msg.text)
        if finish is not None:
            end = msg, finish
    assert end is not None, "_until_final ends with the finish message or raises"
    last, finish = end
    body = enc.envelope("".join(parts), enc.stop(last, finish), usage_of(last))
    return JSONResponse(body, headers={**headers, **cost_headers(last)})


async def _events(call: GenerateCall, first: router_pb2.GenerateResponse, enc: MessageEncoder) -> AsyncIterator[bytes]:
    """The SSE body; an error after the first byte is one ``event: error`` frame. Closes the call at the end."""
    try:
        pending = enc.opening()
        try:
            async for msg, finish in _until_final(call, first):
                if msg.text:
                    pending += enc.delta(msg.text)
                if finish is not None:
                    pending += enc.closing(enc.stop(msg, finish), usage_of(msg))
                yield pending
                pending = b""
        except GatewayError as err:
            yield pending + event("error", error_body(err)[1])
    finally:
        await call.close()


async def messages_route(request: Request) -> Response:
    """``POST /v1/messages``."""
    return await _answered(_messages(request))


async def count_tokens_route(request: Request) -> Response:
    """``POST /v1/messages/count_tokens``: the router counts with the model's tokenizer and chat template."""
    async def count() -> Response:
        metadata = (*caller_metadata(request.headers), (wire.REQUEST_ID, request.state.request_id))
        body = parse_request(await request.body(), CountTokensRequest)
        router: RouterApi = request.app.state.router
        resp = await unless_gone(request, router.count_tokens(body.to_pb(), metadata=metadata))
        return JSONResponse({"input_tokens": resp.input_tokens})

    return await _answered(count())


async def _answered(work: Awaitable[Response]) -> Response:
    """``work``'s response, or its failure in Anthropic's error shape."""
    try:
        return await work
    except GatewayError as err:
        return error_response(err)
    except StarletteHTTPException as exc:  # the body limit, raised from the middleware's receive
        return error_response(GatewayError(exc.status_code, str(exc.detail)))
    except ClientDisconnect:
        return error_response(client_gone())


async def _messages(request: Request) -> Response:
    metadata = (*caller_metadata(request.headers), (wire.REQUEST_ID, request.state.request_id))
    body = parse_request(await request.body(), MessagesRequest)
    router: RouterApi = request.app.state.router
    opened = router.generate(body.to_generate_request(), metadata=metadata)
    call: GenerateCall | None = opened
    try:
        first = await unless_gone(request, opened.first())
        headers = forwarded_headers(await opened.initial_metadata())
        enc = MessageEncoder(first)
        if body.stream:
            stream = StreamingResponse(_events(opened, first, enc), media_type="text/event-stream",
                                       headers={**headers, **STREAM_HEADERS})
            call = None  # the stream closes it
            return stream
        return await unless_gone(request, _message(opened, first, enc, headers))
    finally:
        if call is not None:
            await call.close()

