"""OpenAI's Responses API (``POST /v1/responses``, ``GET``/``DELETE /v1/responses/{id}``) on the router's ``Generate``.

The request (``responses_protocol``) becomes the ``GenerateRequest`` a chat completion sends, so admission, rate
limits and metering are the chat route's. ``ResponseBuilder`` turns the router's messages into the ``response``
object and its semantic stream events (``response.created`` … ``response.completed``); the same builder makes
both, so a streamed and a plain answer cannot differ. ``store`` and ``previous_response_id`` are served by a
bounded in-process ``ResponseStore`` (see ``docs/api-responses.md``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from inferplane.common import wire
from inferplane.common.money import format_usd
from inferplane.gateway.auth import key_metadata
from inferplane.gateway.disconnect import client_gone, unless_gone
from inferplane.gateway.errors import GatewayError, forwarded_headers
from inferplane.gateway.protocol import finish_reason
from inferplane.gateway.responses_protocol import ResponsesRequest, parse_request
from inferplane.gateway.upstream import GenerateCall, RouterApi
from inferplane.v1 import common_pb2, router_pb2

STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
# The response's error.code (ResponseErrorCode) for a failure after the stream started, by HTTP status.
FAILED_CODES = {429: "rate_limit_exceeded", 400: "invalid_prompt"}
# The router names the chat route's fields in its errors; these are their names in a Responses request.
ROUTER_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}
STORE_MAX_RESPONSES = 1000
STORE_MAX_BYTES = 64 * 1024 * 1024


# --- response ---------------------------------------------------------------------------------------------

Event = tuple[str, dict[str, Any]]


def usage_of(msg: router_pb2.GenerateResponse) -> dict[str, Any] | None:
    """The Responses API's ``usage``, plus the extension ``cost`` (exact USD) when the request was priced."""
    if not msg.HasField("usage"):
        return None
    u = msg.usage
    out: dict[str, Any] = {"input_tokens": u.prompt_tokens,
                           "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
                           "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                           "total_tokens": u.total_tokens}
    if u.HasField("cost_nanodollars"):
        out["cost"] = format_usd(u.cost_nanodollars)
    return out


@dataclass
class ResponseBuilder:
    """One response's output items and stream events, from the router's messages in order.

    At most one message item is open at a time; a function call closes it (text after a call opens a new one).
    Function call items stay open until the end, so deltas of several calls may interleave."""

    echo: dict[str, Any]
    id: str
    created_at: int
    model: str
    items: list[dict[str, Any]] = field(default_factory=list)
    seq: int = 0
    _text: list[str] | None = None  # the open message item's text so far
    _calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # the router's call index → its item
    _request_id: str = ""
    final: dict[str, Any] = field(default_factory=dict)  # set by finish()

    @classmethod
    def first(cls, echo: dict[str, Any], msg: router_pb2.GenerateResponse) -> ResponseBuilder:
        return cls(echo, f"resp_{msg.request_id}", msg.created, msg.model, _request_id=msg.request_id)

    def response(self, status: str, **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "completed_at": None, "error": None, "incomplete_details": None, "model": self.model,
                "output": self.items, **self.echo, **extra}  # usage: once known (it is no nullable field)

    def _event(self, kind: str, **data: Any) -> Event:
        out = (kind, {"type": kind, "sequence_number": self.seq, **data})
        self.seq += 1
        return out

    def opening(self) -> list[Event]:
        snapshot = self.response("in_progress", output=[])
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def add(self, msg: router_pb2.GenerateResponse) -> list[Event]:
        events: list[Event] = []
        if msg.text:
            if self._text is None:
                events += self._open_message()
            self._text.append(msg.text)  # type: ignore[union-attr]
            events.append(self._event("response.output_text.delta", item_id=self.items[-1]["id"],
                                      output_index=len(self.items) - 1, content_index=0, delta=msg.text,
                                      logprobs=[]))
        for delta in msg.tool_calls:
            item = self._calls.get(delta.index)
            if item is None:
                events += self._close_message("completed")
                item = {"type": "function_call", "id": f"fc_{self._request_id}_{delta.index}",
                        "call_id": delta.id or f"call_{self._request_id}_{delta.index}", "name": delta.name,
                        "arguments": "", "status": "in_progress"}
                self._calls[delta.index] = item
                self.items.append(item)
                events.append(self._event("response.output_item.added", output_index=len(self.items) - 1,
                                          item=dict(item)))
            if delta.arguments:
                item["arguments"] += delta.arguments
                events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                          output_index=self.items.index(item), delta=delta.arguments))
        return events

    def _open_message(self) -> list[Event]:
        item = {"type": "message", "id": f"msg_{self._request_id}_{len(self.items)}", "status": "in_progress",
                "role": "assistant", "content": []}
        self.items.append(item)
        self._text = []
        index = len(self.items) - 1
        return [self._event("response.output_item.added", output_index=index, item={**item, "content": []}),
                self._event("response.content_part.added", item_id=item["id"], output_index=index,
                            content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                   "logprobs": []})]

    def _close_message(self, status: str) -> list[Event]:
        if self._text is None:
            return []
        item = next(i for i in reversed(self.items) if i["type"] == "message")
        index = self.items.index(item)
        part = {"type": "output_text", "text": "".join(self._text), "annotations": [], "logprobs": []}
        self._text = None
        item["content"], item["status"] = [part], status
        return [self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=part["text"], logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def finish(self, msg: router_pb2.GenerateResponse, finish: str) -> list[Event]:
        """The closing events; ``self.final`` is the finished response."""
        status = "incomplete" if finish == wire.LENGTH else "completed"
        events = self._close_message(status)
        for item in self._calls.values():
            index = self.items.index(item)
            item["status"] = status
            events += [self._event("response.function_call_arguments.done", item_id=item["id"], name=item["name"],
                                   output_index=index, arguments=item["arguments"]),
                       self._event("response.output_item.done", output_index=index, item=item)]
        self._calls = {}
        if status == "incomplete":
            self.final = self.response(status, incomplete_details={"reason": "max_output_tokens"},
                                       usage=usage_of(msg))
        else:
            self.final = self.response(status, completed_at=int(time.time()), usage=usage_of(msg))
        events.append(self._event(f"response.{status}", response=self.final))
        return events

    def failed(self, err: GatewayError) -> list[Event]:
        code = FAILED_CODES.get(err.status, "server_error")
        failed = self.response("failed", error={"code": code, "message": err.message})
        return [self._event("response.failed", response=failed)]


def sse(events: Iterable[Event]) -> bytes:
    """Server-sent events as OpenAI names them: ``event: <type>`` and its JSON."""
    return b"".join(f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"
                    .encode() for kind, data in events)


def output_messages(response: dict[str, Any]) -> list[common_pb2.ChatMessage]:
    """A finished response's output as the chat messages that continue its conversation."""
    out: list[common_pb2.ChatMessage] = []
    for item in response["output"]:
        if item["type"] == "message":
            out.append(common_pb2.ChatMessage(role="assistant", content="".join(p["text"] for p in item["content"])))
        else:
            if not out or out[-1].role != "assistant":
                out.append(common_pb2.ChatMessage(role="assistant"))
            out[-1].tool_calls.add(id=item["call_id"], name=item["name"], arguments=item["arguments"])
    return out


# --- store ------------------------------------------------------------------------------------------------

@dataclass
class Stored:
    response: dict[str, Any]
    conversation: tuple[common_pb2.ChatMessage, ...]  # input and output, without instructions
    size: int


class ResponseStore:
    """Stored responses of this gateway process, per API key (its SHA-256: the key itself is never kept).

    Bounded: at most ``max_responses`` responses and ``max_bytes`` of their JSON and conversations; the least
    recently used goes first. Lost on restart and not shared between gateway processes."""

    def __init__(self, max_responses: int = STORE_MAX_RESPONSES, max_bytes: int = STORE_MAX_BYTES) -> None:
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[str, str], Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, owner: str, response: dict[str, Any], conversation: Iterable[common_pb2.ChatMessage]) -> None:
        kept = tuple(conversation)
        size = len(json.dumps(response)) + sum(m.ByteSize() for m in kept)
        if size > self.max_bytes:
            return
        self.delete(owner, response["id"])
        self._entries[owner, response["id"]] = Stored(response, kept, size)
        self.bytes += size
        while len(self._entries) > self.max_responses or self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.size

    def get(self, owner: str, response_id: str) -> Stored | None:
        entry = self._entries.get((owner, response_id))
        if entry is not None:
            self._entries.move_to_end((owner, response_id))
        return entry

    def delete(self, owner: str, response_id: str) -> bool:
        entry = self._entries.pop((owner, response_id), None)
        if entry is not None:
            self.bytes -= entry.size
        return entry is not None


def owner_of(metadata: tuple[tuple[str, str], ...]) -> str:
    """The store's name for a caller: the SHA-256 of its ``authorization`` metadata."""
    return hashlib.sha256(dict(metadata)[wire.AUTHORIZATION].encode()).hexdigest()


def store_of(request: Request) -> ResponseStore:
    store: ResponseStore = request.app.state.responses
    return store


# --- routes -----------------------------------------------------------------------------------------------

async def _until_final(call: GenerateCall, msg: router_pb2.GenerateResponse
                       ) -> AsyncIterator[tuple[router_pb2.GenerateResponse, str | None]]:
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


@dataclass
class _Turn:
    """One request's life: the body, what it continues, and where a finished response is kept."""

    body: ResponsesRequest
    owner: str
    history: tuple[common_pb2.ChatMessage, ...]
    store: ResponseStore

    def keep(self, response: dict[str, Any]) -> None:
        if self.body.store is not False:
            conversation = (*self.history, *self.body.input_messages(), *output_messages(response))
            self.store.put(self.owner, response, conversation)


async def _complete(call: GenerateCall, first: router_pb2.GenerateResponse, turn: _Turn,
                    headers: dict[str, str]) -> JSONResponse:
    builder = ResponseBuilder.first(turn.body.echo(), first)
    async for msg, finish in _until_final(call, first):  # to the call's end: its status is read too
        builder.add(msg)
        if finish is not None:
            builder.finish(msg, finish)
    turn.keep(builder.final)
    cost = (builder.final.get("usage") or {}).get("cost")
    return JSONResponse(builder.final, headers={**headers, **({"x-inferplane-cost": cost} if cost else {})})


async def _events(call: GenerateCall, first: router_pb2.GenerateResponse, turn: _Turn) -> AsyncIterator[bytes]:
    """The SSE body; a failure after the first byte is ``response.failed``. Closes the call at the end."""
    builder = ResponseBuilder.first(turn.body.echo(), first)
    try:
        pending = builder.opening()
        try:
            async for msg, finish in _until_final(call, first):
                pending += builder.add(msg)
                if finish is not None:
                    pending += builder.finish(msg, finish)
                yield sse(pending)
                pending = []
            turn.keep(builder.final)
        except GatewayError as err:
            yield sse([*pending, *builder.failed(err)])
    finally:
        await call.close()


async def _metadata_and_body(request: Request) -> tuple[tuple[tuple[str, str], ...], ResponsesRequest]:
    metadata = (*key_metadata(request.headers), (wire.REQUEST_ID, request.state.request_id))
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise client_gone() from None
    return metadata, parse_request(raw)


async def create_response(request: Request) -> Response:
    """``POST /v1/responses``."""
    metadata, body = await _metadata_and_body(request)
    store, owner = store_of(request), owner_of(metadata)
    history: tuple[common_pb2.ChatMessage, ...] = ()
    if body.previous_response_id is not None:
        previous = store.get(owner, body.previous_response_id)
        if previous is None:
            raise GatewayError(404, f"Previous response with id '{body.previous_response_id}' not found.",
                               param="previous_response_id")
        history = previous.conversation
    turn = _Turn(body, owner, history, store)
    router: RouterApi = request.app.state.router
    opened = router.generate(body.to_generate_request(history), metadata=metadata)
    call: GenerateCall | None = opened
    try:
        try:
            first = await unless_gone(request, opened.first())
        except GatewayError as err:
            err.param = ROUTER_PARAMS.get(err.param or "", err.param)
            raise
        headers = forwarded_headers(await opened.initial_metadata())
        if body.stream:
            stream = StreamingResponse(_events(opened, first, turn), media_type="text/event-stream",
                                       headers={**headers, **STREAM_HEADERS})
            call = None  # the stream closes it
            return stream
        return await unless_gone(request, _complete(opened, first, turn, headers))
    finally:
        if call is not None:
            await call.close()


async def _stored(request: Request) -> tuple[str, ResponseStore]:
    """The caller's store name, once the router has accepted its key (a revoked key reads nothing)."""
    metadata = (*key_metadata(request.headers), (wire.REQUEST_ID, request.state.request_id))
    router: RouterApi = request.app.state.router
    await unless_gone(request, router.list_models(metadata=metadata))
    return owner_of(metadata), store_of(request)


async def get_response(request: Request, response_id: str) -> Response:
    """``GET /v1/responses/{response_id}``: a stored response of the caller's key."""
    owner, store = await _stored(request)
    entry = store.get(owner, response_id)
    if entry is None:
        raise GatewayError(404, f"Response with id '{response_id}' not found.")
    return JSONResponse(entry.response)


async def delete_response(request: Request, response_id: str) -> Response:
    """``DELETE /v1/responses/{response_id}``."""
    owner, store = await _stored(request)
    if not store.delete(owner, response_id):
        raise GatewayError(404, f"Response with id '{response_id}' not found.")
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
