"""``/v1/responses`` against the scripted fake router of ``test_gateway``: the conversion to ``Generate``, the
response object and its stream events (each checked against OpenAI's OpenAPI description and the SDK's typed
models), the refusals, the router's failures before and after the stream started, and the response store.

Function calls and JSON formats are checked on synthetic router messages (the fake's ``tiny-tools`` script and
``ResponseBuilder`` fed directly): the router side of tools and constraints is not what these tests are about.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from inferplane.gateway.errors import GatewayError
from inferplane.gateway.responses import ResponseBuilder, ResponseStore, sse
from inferplane.gateway.responses_protocol import parse_request
from inferplane.v1 import common_pb2, router_pb2
from tests.integration.test_gateway import (  # noqa: F401 (the fixture)
    API_KEY,
    CREATED,
    SCRIPTS,
    FakeRouter,
    Stack,
    assert_error,
    stack,
)
from tests.openai_schema import validate

HEADERS = {"authorization": f"Bearer {API_KEY}"}
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
# Generous deadlines: CI runs these on 2 shared cores.
DEADLINE_S = 30


def body(model: str = "tiny", **extra: Any) -> dict[str, Any]:
    return {"model": model, "input": "Say hello", **extra}


def checked(response: dict[str, Any]) -> Response:
    """The response object, valid against the OpenAPI description and the SDK's model."""
    validate(response, "Response")
    return Response.model_validate(response)


# Each event's own component (a failure against it says more than one against the union of all events).
EVENT_SCHEMAS = {"response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
                 "response.output_item.added": "ResponseOutputItemAddedEvent",
                 "response.content_part.added": "ResponseContentPartAddedEvent",
                 "response.output_text.delta": "ResponseTextDeltaEvent",
                 "response.output_text.done": "ResponseTextDoneEvent",
                 "response.content_part.done": "ResponseContentPartDoneEvent",
                 "response.output_item.done": "ResponseOutputItemDoneEvent",
                 "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
                 "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
                 "response.completed": "ResponseCompletedEvent", "response.incomplete": "ResponseIncompleteEvent",
                 "response.failed": "ResponseFailedEvent"}


def events(text: str) -> list[dict[str, Any]]:
    """The stream's events, each valid (schema and SDK), named by its ``event:`` line, numbered 0, 1, ..."""
    out = []
    for frame in text.strip().split("\n\n"):
        kind, data = frame.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        validate(event, EVENT_SCHEMAS[event["type"]])
        validate(event, "ResponseStreamEvent")
        EVENTS.validate_python(event)
        out.append(event)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def without_ids(response: dict[str, Any]) -> dict[str, Any]:
    """A response without what differs from call to call (its ids, its completion time)."""
    out = {k: v for k, v in response.items() if k not in ("id", "completed_at")}
    out["output"] = [{k: v for k, v in item.items() if k != "id"} for item in response["output"]]
    return out


def kinds(got: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in got]


# --- a script of the fake router that calls functions (what the router sends for tool calls) ----------------

def _msg(rid: str, model: str, text: str = "", calls: tuple[router_pb2.ToolCallDelta, ...] = (),
         finish: int = 0) -> router_pb2.GenerateResponse:
    msg = router_pb2.GenerateResponse(request_id=rid, text=text, finish_reason=finish,  # type: ignore[arg-type]
                                      created=CREATED, model=model, tool_calls=calls)
    if finish:
        msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.total_tokens = 7, 9, 16
        msg.usage.cost_nanodollars = 1234
    return msg


def tool_messages(rid: str, model: str = "tiny-tools") -> list[router_pb2.GenerateResponse]:
    delta = router_pb2.ToolCallDelta
    return [_msg(rid, model, "Let me look."),
            _msg(rid, model, calls=(delta(index=0, id="call_a", name="weather", arguments='{"ci'),)),
            _msg(rid, model, calls=(delta(index=0, arguments='ty": "Paris"}'),
                                    delta(index=1, id="call_b", name="clock", arguments="{}"))),
            _msg(rid, model, finish=common_pb2.FINISH_REASON_TOOL_CALLS)]


async def _tools(fake: FakeRouter, ctx: grpc.aio.ServicerContext, rid: str, model: str
                 ) -> AsyncIterator[router_pb2.GenerateResponse]:
    for msg in tool_messages(rid, model):
        yield msg


SCRIPTS.setdefault("tiny-tools", _tools)
WEATHER = {"type": "function", "name": "weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}, "strict": True}


# --- requests ---------------------------------------------------------------------------------------------

async def test_request_becomes_the_chat_generate_request(stack: Stack) -> None:  # noqa: F811
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    sent: dict[str, Any] = dict(
        model="tiny", instructions="Be brief.", max_output_tokens=16, temperature=0.5, top_p=0.9,
        metadata={"k": "v"}, user="u1", store=False, parallel_tool_calls=False,
        tools=[WEATHER, {"type": "function", "name": "clock", "parameters": None, "strict": False}],
        tool_choice={"type": "function", "name": "weather"},
        text={"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}},
        input=[{"role": "developer", "content": "Answer in JSON."},
               {"role": "user", "content": "Say hello"},
               {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                "content": [{"type": "output_text", "text": "Sure.", "annotations": [], "logprobs": []}]},
               {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "Oslo"}'},
               {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
               {"role": "user", "content": "and now?"}])
    raw = await stack.client.responses.with_raw_response.create(**sent)
    validate(stack.sent[-1], "CreateResponse")
    resp = json.loads(raw.text)
    parsed = checked(resp)
    assert parsed.output_text == "Hello world" and parsed.status == "completed"
    rid = raw.headers["x-request-id"]
    assert resp["id"] == f"resp_{rid}" and resp["created_at"] == CREATED and resp["model"] == "tiny"
    assert raw.headers["x-ratelimit-remaining-requests"] == "99"
    # the echo of what was asked
    assert resp["instructions"] == "Be brief." and resp["max_output_tokens"] == 16
    assert resp["metadata"] == {"k": "v"} and resp["user"] == "u1" and resp["store"] is False
    assert resp["temperature"] == 0.5 and resp["top_p"] == 0.9 and resp["parallel_tool_calls"] is False
    assert resp["tool_choice"] == {"type": "function", "name": "weather"}
    assert resp["tools"] == [WEATHER,
                             {"type": "function", "name": "clock", "description": None, "parameters": None,
                              "strict": False}]
    assert resp["text"] == {"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}}

    req = stack.fake.calls[-1].request
    assert stack.fake.calls[-1].metadata["authorization"] == f"Bearer {API_KEY}"
    assert [(m.role, m.content) for m in req.chat.messages] == [
        ("system", "Be brief."), ("system", "Answer in JSON."), ("user", "Say hello"), ("assistant", "Sure."),
        ("tool", "sunny"), ("user", "and now?")]
    assistant, tool = req.chat.messages[3], req.chat.messages[4]
    assert [(c.id, c.name, c.arguments) for c in assistant.tool_calls] == [("c1", "weather", '{"city": "Oslo"}')]
    assert tool.tool_call_id == "c1"
    assert req.max_tokens == 16 and req.include_usage and req.parallel_tool_calls is False
    assert req.sampling.temperature == pytest.approx(0.5) and req.sampling.top_p == pytest.approx(0.9)
    assert json.loads(req.constraint.json_schema) == schema
    assert [(t.name, t.description, t.strict) for t in req.tools] == [("weather", "The weather in a city.", True),
                                                                       ("clock", "", False)]
    assert json.loads(req.tools[0].parameters) == WEATHER["parameters"] and req.tools[1].parameters == ""
    assert req.tool_choice.mode == router_pb2.ToolChoice.MODE_FUNCTION and req.tool_choice.function_name == "weather"


@pytest.mark.parametrize(("text", "constraint"), [
    (None, None), ({"format": {"type": "text"}}, None),
    ({"format": {"type": "json_object"}}, common_pb2.Constraint(json_object=True)),
])
def test_text_format_becomes_the_constraint(text: dict[str, Any] | None,
                                            constraint: common_pb2.Constraint | None) -> None:
    extra: dict[str, Any] = {"text": text} if text else {}
    req = parse_request(json.dumps(body(**extra)).encode()).to_generate_request()
    assert req.HasField("constraint") == (constraint is not None)
    if constraint is not None:
        assert req.constraint == constraint
    assert not req.tools and not req.HasField("tool_choice") and not req.HasField("parallel_tool_calls")


@pytest.mark.parametrize(("choice", "mode"), [("none", router_pb2.ToolChoice.MODE_NONE),
                                              ("auto", router_pb2.ToolChoice.MODE_AUTO),
                                              ("required", router_pb2.ToolChoice.MODE_REQUIRED)])
def test_tool_choice_modes(choice: str, mode: int) -> None:
    req = parse_request(json.dumps(body(tools=[WEATHER], tool_choice=choice)).encode()).to_generate_request()
    assert req.tool_choice.mode == mode and req.tool_choice.function_name == ""


def test_function_tools_are_strict_unless_told_otherwise() -> None:
    """The Responses API's default, unlike chat completions'."""
    tool = {"type": "function", "name": "f"}
    parsed = parse_request(json.dumps(body(tools=[tool, {**tool, "strict": False}])).encode())
    assert [t.strict for t in parsed.to_generate_request().tools] == [True, False]
    assert [t["strict"] for t in parsed.echo()["tools"]] == [True, False]


def test_a_function_call_joins_the_assistant_turn_before_it() -> None:
    parsed = parse_request(json.dumps(body(input=[
        {"role": "user", "content": [{"type": "input_text", "text": "a"}]},
        {"type": "function_call", "call_id": "x", "name": "f", "arguments": "{}"},  # no text before: its own turn
        {"type": "function_call", "call_id": "y", "name": "g", "arguments": "[]"},
        {"type": "function_call_output", "call_id": "x", "output": [{"type": "input_text", "text": "1"}]},
        {"type": "function_call_output", "call_id": "y", "output": "2"}])).encode())
    msgs = parsed.to_generate_request().chat.messages
    assert [(m.role, m.content, [c.id for c in m.tool_calls], m.tool_call_id) for m in msgs] == [
        ("user", "a", [], ""), ("assistant", "", ["x", "y"], ""), ("tool", "1", [], "x"), ("tool", "2", [], "y")]


# --- refusals ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("sent", "param"), [
    (body(reasoning={"effort": "low"}), "reasoning"),
    (body(truncation="auto"), "truncation"),
    (body(include=["message.output_text.logprobs"]), "include"),
    (body(frobnicate=1), "frobnicate"),
    (body(tools=[{"type": "web_search"}]), "tools[0]"),
    (body(tools=[{"type": "function", "name": "f", "parameters": {}, "extra": 1}]), "tools[0].extra"),
    (body(tools=[{"type": "function", "name": "bad name"}]), "tools[0].name"),
    (body(tool_choice={"type": "web_search_preview"}), "tool_choice"),
    (body(tool_choice={"type": "function", "name": "nope"}, tools=[WEATHER]), "tool_choice"),
    (body(tool_choice="required"), "tool_choice"),
    (body(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), "input[0].content"),
    (body(input=[{"type": "reasoning", "summary": []}]), "input[0]"),
    (body(input=[{"type": "item_reference", "id": "msg_1"}]), "input[0]"),
    (body(input=[{"role": "tool", "content": "x"}]), "input[0].role"),
    (body(input=[{"type": "function_call", "name": "f", "arguments": "{}"}]), "input[0].call_id"),
    (body(input=5), "input"),
    ({"model": "tiny"}, "input"),
    (body(max_output_tokens=8), "max_output_tokens"),
    (body(max_output_tokens=2**40), "max_output_tokens"),
    (body(temperature=2.5), "temperature"),
    (body(top_p=0), "top_p"),
    (body(text={"format": {"type": "xml"}}), "text.format"),
    (body(text={"format": {"type": "json_schema", "schema": {}}}), "text.format.json_schema.name"),
    (body(text={"verbosity": "low"}), "text.verbosity"),
    (body(metadata={str(i): "v" for i in range(17)}), "metadata"),
    (body(metadata={"k": 1}), "metadata.k"),
    (body(stream="sometimes"), "stream"),
])
async def test_refusals_are_400_naming_the_param(stack: Stack, sent: dict[str, Any], param: str) -> None:  # noqa: F811
    calls = len(stack.fake.calls)
    async with httpx.AsyncClient(base_url=stack.base, timeout=10) as http:
        resp = await http.post("/v1/responses", headers=HEADERS, json=sent)
    assert assert_error(resp, 400, param=param)["type"] == "invalid_request_error"
    assert len(stack.fake.calls) == calls  # refused before the router


async def test_null_for_an_unsupported_field_means_not_set(stack: Stack) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=stack.base, timeout=10) as http:
        resp = await http.post("/v1/responses", headers=HEADERS, json=body(reasoning=None, truncation=None))
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("raw", [b"{", b"null", b"[]", b'{"model": 1, "input": "x"}'])
async def test_malformed_bodies_are_400(stack: Stack, raw: bytes) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=stack.base, timeout=10) as http:
        assert_error(await http.post("/v1/responses", headers=HEADERS, content=raw), 400,
                     param=None if raw[:1] != b"{" or raw == b"{" else "model")


async def test_no_key_is_401(stack: Stack) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=stack.base, timeout=10) as http:
        missing = await http.post("/v1/responses", json=body())
        wrong = await http.post("/v1/responses", headers={"authorization": "Bearer sk-wrong-SECRET"}, json=body())
    assert_error(missing, 401)
    assert "SECRET" not in assert_error(wrong, 401, code="invalid_api_key")["message"]


# --- responses and streams --------------------------------------------------------------------------------

async def test_stream_events_and_the_same_response_as_without(stack: Stack) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=stack.base, timeout=10, headers=HEADERS) as http:
        plain = (await http.post("/v1/responses", json=body(store=False))).json()
        streamed = await http.post("/v1/responses", json=body(stream=True, store=False))
    assert streamed.headers["content-type"].startswith("text/event-stream")
    got = events(streamed.text)
    assert kinds(got) == ["response.created", "response.in_progress", "response.output_item.added",
                          "response.content_part.added", *["response.output_text.delta"] * 3,
                          "response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e["delta"] for e in got if e["type"] == "response.output_text.delta"] == ["Hel", "lo", " world"]
    assert got[0]["response"]["status"] == "in_progress" and got[0]["response"]["output"] == []
    final = got[-1]["response"]
    checked(final)
    assert without_ids(final) == without_ids(plain)
    assert plain["output"] == [{"type": "message", "id": plain["output"][0]["id"], "status": "completed",
                                "role": "assistant", "content": [{"type": "output_text", "text": "Hello world",
                                                                  "annotations": [], "logprobs": []}]}]
    assert plain["usage"] == {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                              "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": 8}


async def test_sdk_stream_and_create(stack: Stack) -> None:  # noqa: F811
    async with stack.client.responses.stream(model="tiny", input="hi", instructions="Be brief.") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello world"
    assert final.usage is not None and final.usage.output_tokens == 3
    raw_events = [e async for e in await stack.client.responses.create(model="tiny", input="hi", stream=True)]
    assert raw_events[-1].type == "response.completed" and raw_events[-1].response.output_text == "Hello world"


async def test_length_is_incomplete(stack: Stack) -> None:  # noqa: F811
    plain = await stack.client.responses.create(model="tiny-length", input="hi", max_output_tokens=16)
    assert plain.status == "incomplete" and plain.incomplete_details is not None
    assert plain.incomplete_details.reason == "max_output_tokens" and plain.completed_at is None
    assert plain.output_text == "abcd" and plain.output[0].status == "incomplete"  # type: ignore[union-attr]
    async with httpx.AsyncClient(base_url=stack.base, timeout=10, headers=HEADERS) as http:
        got = events((await http.post("/v1/responses", json=body("tiny-length", stream=True))).text)
    assert got[-1]["type"] == "response.incomplete"
    assert got[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


@pytest.mark.parametrize(("model", "status", "code"), [
    ("no-such-model", 404, "model_not_found"), ("limited", 429, "rate_limit_exceeded"),
    ("forbidden", 403, "insufficient_permissions"), ("down", 503, "service_unavailable"), ("internal", 500, None),
    ("bad-param", 400, None),
])
async def test_router_failures_before_the_first_byte(stack: Stack, model: str, status: int, code: str | None) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=stack.base, timeout=10, headers=HEADERS) as http:
        for stream in (False, True):
            resp = await http.post("/v1/responses", json=body(model, stream=stream))
            param = {"bad-param": "max_output_tokens", "no-such-model": "model"}.get(model)  # the router's names
            err = assert_error(resp, status, param=param, code=code)
            assert "SECRET" not in err["message"]
            if model == "limited":
                assert resp.headers["retry-after"] == "7"


@pytest.mark.parametrize("model", ["broken-mid", "failed-finish"])
async def test_failure_after_the_start_is_response_failed(stack: Stack, model: str) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=stack.base, timeout=10, headers=HEADERS) as http:
        streamed = await http.post("/v1/responses", json=body(model, stream=True))
        plain = await http.post("/v1/responses", json=body(model))
    assert streamed.status_code == 200
    got = events(streamed.text)
    assert got[-1]["type"] == "response.failed" and got[-1]["response"]["status"] == "failed"
    assert got[-1]["response"]["error"]["code"] == "server_error"
    assert plain.status_code == (503 if model == "broken-mid" else 500)


async def test_stream_disconnect_cancels_the_router_call(stack: Stack) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=stack.base, timeout=DEADLINE_S) as http:
        async with http.stream("POST", "/v1/responses", json=body("hang", stream=True),
                               headers={**HEADERS, "x-request-id": "resp-gone-1"}) as response:
            async for line in response.aiter_lines():
                if '"first"' in line:
                    break  # leaving the block closes the connection mid-stream
    await asyncio.wait_for(stack.fake.cancelled["resp-gone-1"].wait(), DEADLINE_S)


async def test_non_stream_disconnect_cancels_the_router_call(stack: Stack) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=stack.base, timeout=DEADLINE_S) as http:
        request = asyncio.create_task(http.post("/v1/responses", json=body("hang"),
                                                headers={**HEADERS, "x-request-id": "resp-gone-2"}))
        await asyncio.wait_for(stack.fake.started["resp-gone-2"].wait(), DEADLINE_S)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    await asyncio.wait_for(stack.fake.cancelled["resp-gone-2"].wait(), DEADLINE_S)


# --- function calls ---------------------------------------------------------------------------------------

def test_function_call_events_from_synthetic_router_messages() -> None:
    request = parse_request(json.dumps(body("tiny-tools", tools=[WEATHER])).encode())
    msgs = tool_messages("r1")
    builder = ResponseBuilder.first(request.echo(), msgs[0])
    out = builder.opening()
    for msg in msgs[:-1]:
        out += builder.add(msg)
    out += builder.finish(msgs[-1], "tool_calls")
    got = events(sse(out).decode())
    assert kinds(got) == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        # the call closes the message
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert [e["output_index"] for e in got if e["type"] == "response.function_call_arguments.delta"] == [1, 1, 2]
    final = checked(got[-1]["response"])
    assert final.output_text == "Let me look." and final.status == "completed"
    calls = [(o.call_id, o.name, o.arguments, o.status) for o in final.output if o.type == "function_call"]
    assert calls == [("call_a", "weather", '{"city": "Paris"}', "completed"), ("call_b", "clock", "{}", "completed")]
    assert got[-1]["response"]["usage"]["cost"] == "0.000001234"
    assert got[-1]["response"] == builder.final


async def test_function_calls_through_the_sdk_and_back(stack: Stack) -> None:  # noqa: F811
    async with stack.client.responses.stream(model="tiny-tools", input="weather?", tools=[WEATHER]) as stream:  # type: ignore[list-item]
        args = [e.delta async for e in stream if e.type == "response.function_call_arguments.delta"]
        final = await stream.get_final_response()
    assert "".join(args) == '{"city": "Paris"}{}'
    plain = await stack.client.responses.create(model="tiny-tools", input="weather?", tools=[WEATHER])  # type: ignore[list-item]
    calls = [[(o.call_id, o.name, o.arguments, o.status) for o in r.output if o.type == "function_call"]
             for r in (plain, final)]
    assert calls[0] == calls[1] == [("call_a", "weather", '{"city": "Paris"}', "completed"),
                                    ("call_b", "clock", "{}", "completed")]
    assert plain.output_text == final.output_text == "Let me look."
    # the client runs the functions and sends the output items back with the results
    await stack.client.responses.create(
        model="tiny", tools=[WEATHER], store=False,  # type: ignore[list-item]
        input=[{"role": "user", "content": "weather?"}, *plain.output,  # type: ignore[list-item]
               {"type": "function_call_output", "call_id": "call_a", "output": "12 C"},
               {"type": "function_call_output", "call_id": "call_b", "output": "noon"}])
    validate(stack.sent[-1], "CreateResponse")
    msgs = stack.fake.calls[-1].request.chat.messages
    assert [(m.role, m.content, [c.id for c in m.tool_calls], m.tool_call_id) for m in msgs] == [
        ("user", "weather?", [], ""), ("assistant", "Let me look.", ["call_a", "call_b"], ""),
        ("tool", "12 C", [], "call_a"), ("tool", "noon", [], "call_b")]


def test_failed_after_a_call_started_keeps_its_items() -> None:
    msgs = tool_messages("r2")
    builder = ResponseBuilder.first(parse_request(json.dumps(body()).encode()).echo(), msgs[0])
    out = builder.opening() + builder.add(msgs[0]) + builder.add(msgs[1])
    out += builder.failed(GatewayError(429, "Rate limit reached."))
    got = events(sse(out).decode())
    failed = checked(got[-1]["response"])
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "rate_limit_exceeded"
    assert [o.type for o in failed.output] == ["message", "function_call"]


# --- stored responses and previous_response_id ----------------------------------------------------------------

async def test_previous_response_id_continues_the_conversation(stack: Stack) -> None:  # noqa: F811
    first = await stack.client.responses.create(model="tiny", instructions="Be brief.", input="Say hello")
    again = await stack.client.responses.retrieve(first.id)
    assert again.model_dump() == first.model_dump()
    second = await stack.client.responses.create(model="tiny", instructions="Be terse.", input="Once more",
                                                 previous_response_id=first.id)
    assert second.previous_response_id == first.id
    msgs = stack.fake.calls[-1].request.chat.messages
    # the instructions of the previous response are not carried over (OpenAI's rule)
    assert [(m.role, m.content) for m in msgs] == [("system", "Be terse."), ("user", "Say hello"),
                                                   ("assistant", "Hello world"), ("user", "Once more")]
    async with stack.client.responses.stream(model="tiny", input="Third", previous_response_id=second.id) as stream:
        third = await stream.get_final_response()
    assert len(stack.fake.calls[-1].request.chat.messages) == 5
    assert (await stack.client.responses.retrieve(third.id)).output_text == "Hello world"
    deleted = await stack.client.responses.delete(first.id)  # type: ignore[func-returns-value]
    assert deleted is None
    async with httpx.AsyncClient(base_url=stack.base, timeout=10, headers=HEADERS) as http:
        assert_error(await http.get(f"/v1/responses/{first.id}"), 404)
        assert_error(await http.delete(f"/v1/responses/{first.id}"), 404)
        assert_error(await http.get(f"/v1/responses/{second.id}", headers={"authorization": "Bearer sk-no"}), 401)


async def test_store_false_is_not_kept(stack: Stack) -> None:  # noqa: F811
    resp = await stack.client.responses.create(model="tiny", input="hi", store=False)
    calls = len(stack.fake.calls)
    async with httpx.AsyncClient(base_url=stack.base, timeout=10, headers=HEADERS) as http:
        assert_error(await http.get(f"/v1/responses/{resp.id}"), 404)
        missing = await http.post("/v1/responses", json=body(previous_response_id=resp.id))
    assert_error(missing, 404, param="previous_response_id")
    assert len(stack.fake.calls) == calls


def test_store_is_per_key_and_bounded() -> None:
    store = ResponseStore(max_responses=2, max_bytes=10_000)
    turn = [common_pb2.ChatMessage(role="user", content="x" * 100)]
    for i in range(3):
        store.put("alice", {"id": f"r{i}", "output": []}, turn)
    assert store.get("alice", "r0") is None and len(store) == 2  # the least recently used went first
    assert store.get("bob", "r1") is None and store.get("alice", "r1") is not None
    store.put("alice", {"id": "r3", "output": []}, turn)
    assert store.get("alice", "r2") is None and store.get("alice", "r1") is not None  # r1 was read since
    big = [common_pb2.ChatMessage(role="user", content="x" * 4_000)]
    store.put("bob", {"id": "b0", "output": []}, big)
    store.put("bob", {"id": "b1", "output": []}, big)
    assert store.bytes <= 10_000 and store.get("bob", "b1") is not None and len(store) <= 2
    store.put("bob", {"id": "huge", "output": []}, [common_pb2.ChatMessage(content="x" * 20_000)])
    assert store.get("bob", "huge") is None  # larger than the whole store: not kept
    assert store.delete("bob", "b1") and not store.delete("bob", "b1")


# --- a seeded fuzz of the body: never a 5xx, every refusal an OpenAI error ---------------------------------------

ODD_VALUES: list[Any] = [None, True, 0, -1, 1.5, 2**31, 2**63, 10**30, float("-inf"), "", "x" * 5000, "\u0000\ud7ff💥",
                         [], [None], [{}], {}, {"type": "function"}, {"type": "message"}, [[1]], {"a": {"b": [1]}}]
FIELDS = ["model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "text", "tools",
          "tool_choice", "parallel_tool_calls", "stream", "store", "previous_response_id", "metadata", "user",
          "reasoning", "unknown_field"]
NESTED = ["input.0.role", "input.0.content", "input.0.content.0", "input.0.content.0.text", "input.0.type",
          "input.1.call_id", "input.1.arguments", "input.2.output", "tools.0.name", "tools.0.parameters",
          "tools.0.strict", "tools.0.type", "text.format", "text.format.type", "text.format.schema", "metadata.k"]


def fuzz_cases(seed: int, n: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    cases = [{**body(), name: value} for name in FIELDS for value in ODD_VALUES]
    for _ in range(n):
        case = body(input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                           {"type": "function_call", "call_id": "c", "name": "weather", "arguments": "{}"},
                           {"type": "function_call_output", "call_id": "c", "output": "1"}],
                    tools=[dict(WEATHER)], metadata={"k": "v"},
                    text={"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}})
        for _ in range(rng.randint(1, 3)):
            *path, last = rng.choice(NESTED + FIELDS).split(".")
            target: Any = case
            for part in path:
                target = target[int(part)] if isinstance(target, list) else target.get(part)
                if not isinstance(target, dict | list):
                    break
            else:
                value = rng.choice(ODD_VALUES)
                if isinstance(target, list):
                    target[int(last) if last.isdigit() and int(last) < len(target) else 0:][:1] = [value]
                elif isinstance(target, dict):
                    target[last] = value
        cases.append(case)
    return cases


async def test_fuzzed_bodies_never_fail_the_server(stack: Stack) -> None:  # noqa: F811
    cases = fuzz_cases(seed=5, n=300)
    raw = [json.dumps(case, allow_nan=True).encode() for case in cases]
    raw += [b'{"model": "tiny", "input": "a\\ud800b"}', b'{"model": "tiny", "input": "x", "temperature": NaN}',
            b'{"model": "tiny", "input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"a": NaN}}]}']
    ok = 0
    async with httpx.AsyncClient(base_url=stack.base, timeout=DEADLINE_S, headers=HEADERS) as http:
        for content in raw:
            resp = await http.post("/v1/responses", content=content)
            assert resp.status_code < 500, (content[:300], resp.text)
            if resp.status_code == 200:
                ok += 1
            else:
                assert_error(resp, resp.status_code, param=resp.json()["error"]["param"])
    assert len(raw) > 600 and 20 < ok < len(raw) - 100, ok
