"""The OpenAI chat/completions surface, without services: request models → ``GenerateRequest``, and synthetic
router message sequences → bodies and SSE chunks through the real ``GenerationEndpoint``.

Every body and chunk is checked twice: against OpenAI's OpenAPI description (``tests/openai_schema.py``) and
with the ``openai`` SDK's own typed models; streamed tool calls and logprobs are assembled by the SDK's
``ChatCompletionStreamState``, as ``client.chat.completions.stream`` assembles them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import openai.types
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from inferplane.gateway.errors import GatewayError
from inferplane.gateway.generation import GENERATION_ROUTES, GenerationEndpoint
from inferplane.gateway.protocol import (
    LOGPROB_FLOOR,
    ChatCompletionEncoder,
    ChatCompletionRequest,
    CompletionRequest,
    sse_frame,
)
from inferplane.v1 import common_pb2, router_pb2
from tests.openai_schema import validate

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
STOP, LENGTH, TOOL_CALLS = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH,
                            common_pb2.FINISH_REASON_TOOL_CALLS)
MESSAGES = [{"role": "user", "content": "hi"}]


# --- a scripted router and the endpoint driven as ASGI ------------------------------------------------

class ScriptedCall:
    """A ``GenerateCall`` that plays back a list of router messages."""

    def __init__(self, script: Sequence[router_pb2.GenerateResponse]) -> None:
        self.script = list(script)
        self.closed = False

    async def first(self) -> router_pb2.GenerateResponse:
        return self.script[0]

    async def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    async def messages(self) -> AsyncGenerator[router_pb2.GenerateResponse]:
        for msg in self.script[1:]:
            yield msg

    async def close(self) -> None:
        self.closed = True


class ScriptedRouter:
    def __init__(self, script: Sequence[router_pb2.GenerateResponse]) -> None:
        self.script = script
        self.requests: list[router_pb2.GenerateRequest] = []

    def generate(self, request: router_pb2.GenerateRequest, *, metadata: Any) -> ScriptedCall:
        self.requests.append(request)
        return ScriptedCall(self.script)


async def post(path: str, body: dict[str, Any], script: Sequence[router_pb2.GenerateResponse] = ()
               ) -> tuple[int, bytes, ScriptedRouter]:
    """POST ``body`` to the generation endpoint whose router plays ``script``: status, body bytes, router."""
    router = ScriptedRouter(script)
    raw = json.dumps(body).encode()
    received = asyncio.Event()  # the caller never leaves: after the body, receive waits for ever

    async def receive() -> dict[str, Any]:
        if not received.is_set():
            received.set()
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST", "headers": [(b"authorization", b"Bearer sk-test")],
             "state": {"request_id": "req1"}}
    status = await GenerationEndpoint(lambda: router)(scope, receive, send)  # type: ignore[arg-type,return-value]
    assert sent[0]["status"] == status
    return status, b"".join(m.get("body", b"") for m in sent[1:]), router


def msg(text: str = "", *, index: int = 0, finish: int = 0, usage: tuple[int, int] | None = None,
        logprobs: Sequence[common_pb2.TokenLogprob] = (), calls: Sequence[router_pb2.ToolCallDelta] = (),
        cost: int | None = None) -> router_pb2.GenerateResponse:
    out = router_pb2.GenerateResponse(request_id="req1", text=text, created=1700000000, model="tiny-llama",
                                      index=index, finish_reason=finish,  # type: ignore[arg-type]
                                      logprobs=logprobs, tool_calls=calls)
    if usage is not None:
        out.usage.prompt_tokens, out.usage.completion_tokens = usage
        out.usage.total_tokens = sum(usage)
        if cost is not None:
            out.usage.cost_nanodollars = cost
    return out


def lp(token: str, logprob: float, *top: tuple[str, float]) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token=token, logprob=logprob, bytes=token.encode(), token_id=len(token),
        top_logprobs=[common_pb2.TopLogprob(token=t, logprob=p, bytes=t.encode()) for t, p in top])


def sse_events(raw: bytes) -> list[Any]:
    """The JSON of every ``data:`` frame, ``[DONE]`` as the string."""
    assert raw.endswith(b"\n\n")
    out = []
    for frame in raw.decode().split("\n\n")[:-1]:
        assert frame.startswith("data: "), frame
        data = frame.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def error_of(status: int, raw: bytes) -> dict[str, Any]:
    assert status == 400, raw
    err: dict[str, Any] = json.loads(raw)["error"]
    validate({"error": err}, "ErrorResponse")
    return err


# --- requests: nothing silently dropped ---------------------------------------------------------------

@pytest.mark.parametrize(("path", "extra", "param"), [
    (CHAT, {"frobnicate": 1}, "frobnicate"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "messages[0].colour"),
    (CHAT, {"stream": True, "stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "shema": {}}}},
     "response_format.json_schema.shema"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f", "parametres": {}}}]},
     "tools[0].function.parametres"),
    (CHAT, {"min_p": 0.1}, "min_p"),
    (COMPLETIONS, {"frobnicate": 1}, "frobnicate"),
])
async def test_an_unknown_field_is_a_400_naming_it(path: str, extra: dict[str, Any], param: str) -> None:
    body = {"model": "m", **({"messages": MESSAGES} if path == CHAT else {"prompt": "p"}), **extra}
    err = error_of(*(await post(path, body))[:2])
    assert err["param"] == param
    assert err["code"] == "unknown_parameter"
    assert err["message"] == f"Unknown parameter: '{param}'."


@pytest.mark.parametrize(("path", "field", "value", "needle"), [
    (CHAT, "audio", {"voice": "alloy", "format": "wav"}, "audio"),
    (CHAT, "modalities", ["text", "audio"], "modality"),
    (CHAT, "prediction", {"type": "content", "content": "x"}, "predicted"),
    (CHAT, "web_search_options", {}, "web search"),
    (CHAT, "functions", [{"name": "f"}], "use 'tools'"),
    (CHAT, "function_call", "auto", "use 'tool_choice'"),
    (CHAT, "service_tier", "scale", "service_tier"),
    (CHAT, "store", True, "stored"),
    (CHAT, "reasoning_effort", "low", "reason"),
    (CHAT, "n", 0, "greater than or equal to 1"),
    (CHAT, "n", 129, "less than or equal to 128"),
    (CHAT, "top_logprobs", 3, "requires 'logprobs'"),
    (CHAT, "presence_penalty", 2.5, "less than or equal to 2"),
    (CHAT, "frequency_penalty", -2.5, "greater than or equal to -2"),
    (CHAT, "logit_bias", {"abc": 1}, "token ids"),
    (CHAT, "logit_bias", {str(i): 1 for i in range(301)}, "at most 300"),
    (CHAT, "repetition_penalty", 0, "greater than 0"),
    (CHAT, "top_k", -2, "greater than or equal to -1"),
    (CHAT, "tool_choice", "required", "only allowed when 'tools'"),
    (CHAT, "parallel_tool_calls", True, "only allowed when 'tools'"),
    (CHAT, "tools", [{"type": "custom", "custom": {"name": "x"}}], "'function'"),
    (CHAT, "response_format", {"type": "json_schema"}, "'json_schema' is required"),
    (COMPLETIONS, "echo", True, "echo"),
    (COMPLETIONS, "suffix", "end", "suffix"),
    (COMPLETIONS, "best_of", 3, "best_of equal to n"),
    (COMPLETIONS, "logprobs", 6, "less than or equal to 5"),
    (COMPLETIONS, "prompt", ["one", "two"], "several prompts"),
])
async def test_a_field_that_cannot_be_honoured_is_refused_by_name(path: str, field: str, value: Any,
                                                                   needle: str) -> None:
    body = {"model": "m", **({"messages": MESSAGES} if path == CHAT else {"prompt": "p"}), field: value}
    err = error_of(*(await post(path, body))[:2])
    assert err["param"] is not None and err["param"].split(".")[0].split("[")[0] == field, err
    assert needle in err["message"], err


@pytest.mark.parametrize(("messages", "param", "needle"), [
    ([{"role": "tool", "content": "42"}], "messages[0].tool_call_id", "required on 'tool'"),
    ([{"role": "user", "content": "x", "tool_call_id": "c"}], "messages[0].tool_call_id", "only allowed on 'tool'"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls", "only allowed on 'assistant'"),
    ([{"role": "assistant", "content": None, "refusal": "no"}], "messages[0].refusal", "refusal"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content",
     "only text"),
])
async def test_message_rules(messages: list[dict[str, Any]], param: str, needle: str) -> None:
    err = error_of(*(await post(CHAT, {"model": "m", "messages": messages}))[:2])
    assert err["param"] == param and needle in err["message"], err


async def test_tool_choice_names_a_given_function() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    err = error_of(*(await post(CHAT, {"model": "m", "messages": MESSAGES, "tools": tools,
                                       "tool_choice": {"type": "function", "function": {"name": "other"}}}))[:2])
    assert err["param"] == "tool_choice" and "'other'" in err["message"]
    dup = error_of(*(await post(CHAT, {"model": "m", "messages": MESSAGES, "tools": tools * 2}))[:2])
    assert dup["param"] == "tools" and "unique" in dup["message"]


async def test_min_tokens_above_max_tokens_is_a_400() -> None:
    err = error_of(*(await post(CHAT, {"model": "m", "messages": MESSAGES, "max_completion_tokens": 5,
                                       "min_tokens": 6}))[:2])
    assert err["param"] == "min_tokens"


def test_values_that_change_nothing_are_accepted() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": MESSAGES, "store": False, "modalities": ["text"], "service_tier": "auto",
        "metadata": {"k": "v"}, "user": "u", "safety_identifier": "s", "prompt_cache_key": "k",
        "response_format": {"type": "text"}, "tool_choice": "none", "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False}})
    assert not req.to_generate_request().HasField("constraint")
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["p"], "echo": False, "n": 2,
                                             "best_of": 2}).to_generate_request().n == 2


def test_the_chat_request_maps_every_field() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = {
        "model": "m", "max_completion_tokens": 64, "temperature": 0.5, "top_p": 0.9, "seed": -7, "stop": "END",
        "n": 3, "presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"50256": -100, "7": 2.5},
        "top_k": 40, "min_tokens": 4, "ignore_eos": True, "repetition_penalty": 1.1, "logprobs": True,
        "top_logprobs": 5, "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": schema, "strict": True}},
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "d",
                                                    "parameters": schema, "strict": True}},
                  {"type": "function", "function": {"name": "noop"}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "weather "}, {"type": "text", "text": "in Oslo"}]},
            {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": "{\"city\":\"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "-3C"}],
    }
    req = ChatCompletionRequest.model_validate(body).to_generate_request()
    s = req.sampling
    assert (req.max_tokens, req.n, list(req.stop), req.logprobs, req.top_logprobs) == (64, 3, ["END"], True, 5)
    assert (s.temperature, round(s.top_p, 5), s.seed, s.presence_penalty, s.frequency_penalty) == (0.5, 0.9, -7, 0.5,
                                                                                                    -1)
    assert (s.top_k, s.min_tokens, s.ignore_eos, round(s.repetition_penalty, 5)) == (40, 4, True, 1.1)
    assert dict(s.logit_bias) == {50256: -100.0, 7: 2.5}
    assert json.loads(req.constraint.json_schema) == schema
    assert [(t.name, t.description, t.strict) for t in req.tools] == [("get_weather", "d", True), ("noop", "", False)]
    assert json.loads(req.tools[0].parameters) == schema and req.tools[1].parameters == ""
    assert (req.tool_choice.mode, req.tool_choice.function_name) == (router_pb2.ToolChoice.MODE_FUNCTION,
                                                                     "get_weather")
    assert req.HasField("parallel_tool_calls") and not req.parallel_tool_calls
    m = req.chat.messages
    assert [x.role for x in m] == ["system", "user", "assistant", "tool"]
    assert m[1].content == "weather in Oslo"
    assert [(c.id, c.name, c.arguments) for c in m[2].tool_calls] == [("call_1", "get_weather", '{"city":"Oslo"}')]
    assert m[2].content == "" and m[3].tool_call_id == "call_1" and not m[1].HasField("tool_call_id")


def test_defaults_map_to_an_unchanged_request() -> None:
    """n=1 and no new field: the request the router got before (no n, no constraint, no tools)."""
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "top_k": -1}).to_generate_request()
    assert not req.HasField("n") and not req.HasField("constraint") and not req.HasField("tool_choice")
    assert not req.logprobs and not req.sampling.HasField("top_k") and not req.tools
    obj = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES,
                                                "response_format": {"type": "json_object"}})
    assert obj.to_generate_request().constraint.json_object


def test_completion_logprobs_map_to_top_alternatives() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": "p", "logprobs": 3}).to_generate_request()
    assert req.logprobs and req.top_logprobs == 3
    zero = CompletionRequest.model_validate({"model": "m", "prompt": "p", "logprobs": 0}).to_generate_request()
    assert zero.logprobs and not zero.HasField("top_logprobs")


# --- bodies -------------------------------------------------------------------------------------------

TWO_CHOICES = [  # interleaved, each with its own finish; the usage on the very last message
    msg("Hel", index=1, logprobs=[lp("Hel", -0.5, ("Hel", -0.5), ("Hi", -1.5))]),
    msg("Yes", index=0, logprobs=[lp("Yes", -0.1, ("Yes", -0.1), ("No", -2.0))]),
    msg("lo", index=1, logprobs=[lp("lo", float("-inf"), ("lo", -0.01), ("la", -5.0))]),
    msg("!", index=0, finish=STOP, logprobs=[lp("!", -0.2, ("!", -0.2), (".", -1.7))]),
    msg("", index=1, finish=LENGTH, usage=(5, 5), cost=1234),
]


async def test_chat_body_has_n_choices_in_order_with_logprobs() -> None:
    status, raw, router = await post(CHAT, {"model": "m", "messages": MESSAGES, "n": 2, "logprobs": True,
                                            "top_logprobs": 2}, TWO_CHOICES)
    assert status == 200, raw
    body = json.loads(raw)
    validate(body, "CreateChatCompletionResponse")
    completion = ChatCompletion.model_validate(body)
    assert router.requests[0].n == 2 and router.requests[0].top_logprobs == 2
    assert [c.index for c in completion.choices] == [0, 1]
    assert [c.message.content for c in completion.choices] == ["Yes!", "Hello"]
    assert [c.finish_reason for c in completion.choices] == ["stop", "length"]
    second = completion.choices[1].logprobs
    assert second is not None and second.content is not None
    assert [(t.token, t.logprob, t.bytes) for t in second.content] == [("Hel", -0.5, list(b"Hel")),
                                                                       ("lo", LOGPROB_FLOOR, list(b"lo"))]
    assert [(t.token, t.logprob) for t in second.content[0].top_logprobs] == [("Hel", -0.5), ("Hi", -1.5)]
    assert body["choices"][0]["logprobs"]["refusal"] is None
    assert completion.usage is not None and completion.usage.total_tokens == 10
    assert body["usage"]["cost"] == "0.000001234"


async def test_chat_body_with_tool_calls() -> None:
    script = [
        msg("", calls=[router_pb2.ToolCallDelta(index=0, id="call_a", name="get_weather")]),
        msg("", calls=[router_pb2.ToolCallDelta(index=0, arguments='{"city":'),
                       router_pb2.ToolCallDelta(index=1, id="call_b", name="get_time", arguments="{}")]),
        msg("", finish=TOOL_CALLS, usage=(9, 7), calls=[router_pb2.ToolCallDelta(index=0, arguments='"Oslo"}')]),
    ]
    tools = [{"type": "function", "function": {"name": n}} for n in ("get_weather", "get_time")]
    status, raw, _ = await post(CHAT, {"model": "m", "messages": MESSAGES, "tools": tools}, script)
    assert status == 200, raw
    body = json.loads(raw)
    validate(body, "CreateChatCompletionResponse")
    choice = ChatCompletion.model_validate(body).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None and choice.logprobs is None
    calls = choice.message.tool_calls or []
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("call_a", "function", "get_weather", '{"city":"Oslo"}'), ("call_b", "function", "get_time", "{}")]


async def test_completion_body_with_logprobs_and_two_choices() -> None:
    status, raw, _ = await post(COMPLETIONS, {"model": "m", "prompt": "p", "n": 2, "logprobs": 2}, TWO_CHOICES)
    assert status == 200, raw
    body = json.loads(raw)
    validate(body, "CreateCompletionResponse")
    completion = openai.types.Completion.model_validate(body)
    assert [c.text for c in completion.choices] == ["Yes!", "Hello"]
    logprobs = completion.choices[1].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["Hel", "lo"] and logprobs.text_offset == [0, 3]
    assert logprobs.token_logprobs == [-0.5, LOGPROB_FLOOR]
    assert logprobs.top_logprobs == [{"Hel": -0.5, "Hi": -1.5}, {"lo": -0.01, "la": -5.0}]


async def test_without_logprobs_asked_the_body_has_none() -> None:
    status, raw, _ = await post(COMPLETIONS, {"model": "m", "prompt": "p"}, [msg("x", finish=STOP, usage=(1, 1))])
    assert status == 200 and json.loads(raw)["choices"][0]["logprobs"] is None


# --- streams ------------------------------------------------------------------------------------------

def check_chat_stream(raw: bytes, *, include_usage: bool) -> list[ChatCompletionChunk]:
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = []
    for event in events[:-1]:
        validate(event, "CreateChatCompletionStreamResponse")
        chunks.append(ChatCompletionChunk.model_validate(event))
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert all(c.usage is None for c in chunks[:-1])
    return chunks


async def test_chat_stream_interleaves_choices_and_ends_after_all() -> None:
    status, raw, _ = await post(CHAT, {"model": "m", "messages": MESSAGES, "n": 2, "logprobs": True,
                                       "top_logprobs": 2, "stream": True, "stream_options": {"include_usage": True}},
                                TWO_CHOICES)
    assert status == 200
    chunks = check_chat_stream(raw, include_usage=True)
    openings = [c.choices[0] for c in chunks[:2]]
    assert [(o.index, o.delta.role) for o in openings] == [(0, "assistant"), (1, "assistant")]
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks if c.choices
                and c.choices[0].finish_reason]
    assert finishes == [(0, "stop"), (1, "length")]
    assert chunks[-2].choices[0].finish_reason == "length"  # the usage chunk follows the last finish
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5

    # The SDK's assembly refuses a "length" finish (LengthFinishReasonError): the same stream, ended by a stop.
    script = [*TWO_CHOICES[:-1], msg("", index=1, finish=STOP, usage=(5, 5))]
    raw = (await post(CHAT, {"model": "m", "messages": MESSAGES, "n": 2, "logprobs": True, "stream": True}, script))[1]
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in check_chat_stream(raw, include_usage=False):
        state.handle_chunk(chunk)
    final = state.get_final_completion()
    assert [(c.index, c.message.content, c.finish_reason) for c in final.choices] == [(0, "Yes!", "stop"),
                                                                                       (1, "Hello", "stop")]
    assert final.choices[1].logprobs is not None and final.choices[1].logprobs.content is not None
    assert [t.token for t in final.choices[1].logprobs.content] == ["Hel", "lo"]


async def test_chat_stream_tool_calls_assemble_in_the_sdk() -> None:
    script = [
        msg("Let me check.", calls=[router_pb2.ToolCallDelta(index=0, id="call_a", name="get_weather")]),
        msg("", calls=[router_pb2.ToolCallDelta(index=0, arguments='{"city":')]),
        msg("", calls=[router_pb2.ToolCallDelta(index=0, arguments='"Oslo"}'),
                       router_pb2.ToolCallDelta(index=1, id="call_b", name="get_time", arguments='{"tz":"UTC"}')]),
        msg("", finish=TOOL_CALLS, usage=(9, 7)),
    ]
    tools = [{"type": "function", "function": {"name": "get_weather",
                                                "parameters": {"type": "object", "properties": {}}}},
             {"type": "function", "function": {"name": "get_time"}}]
    status, raw, _ = await post(CHAT, {"model": "m", "messages": MESSAGES, "tools": tools, "stream": True}, script)
    assert status == 200
    chunks = check_chat_stream(raw, include_usage=False)
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState(input_tools=tools)  # type: ignore[arg-type]
    events = [e.type for chunk in chunks for e in state.handle_chunk(chunk)]
    assert "tool_calls.function.arguments.done" in events
    choice = state.get_final_completion().choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    assert calls == [("call_a", "get_weather", '{"city":"Oslo"}'), ("call_b", "get_time", '{"tz":"UTC"}')]


async def test_completion_stream_with_logprobs_and_offsets() -> None:
    status, raw, _ = await post(COMPLETIONS, {"model": "m", "prompt": "p", "n": 2, "logprobs": 1, "stream": True,
                                              "stream_options": {"include_usage": True}}, TWO_CHOICES)
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    per_choice: dict[int, list[int]] = {0: [], 1: []}
    for event in events[:-1]:
        validate(event, "CreateCompletionStreamResponse")
        # The SDK's CompletionChoice has a non-nullable finish_reason (it builds stream chunks unvalidated).
        for c in (openai.types.CompletionChoice.model_validate({**c, "finish_reason": c["finish_reason"] or "stop"})
                  for c in event["choices"]):
            if c.logprobs is not None:
                per_choice[c.index] += c.logprobs.text_offset or []
    assert per_choice == {0: [0, 3], 1: [0, 3]}
    assert events[-2]["choices"] == [] and events[-2]["usage"]["total_tokens"] == 10


async def test_plain_text_keeps_the_fast_path_bytes() -> None:
    """n=1 without logprobs: the frames are exactly the chunk objects serialised (the template is right)."""
    script = [msg("Hi"), msg(" there", finish=STOP, usage=(2, 2))]
    status, raw, _ = await post(CHAT, {"model": "m", "messages": MESSAGES, "stream": True}, script)
    assert status == 200
    enc = ChatCompletionEncoder(script[0])
    expected = b"".join(sse_frame(c) for c in [*enc.opening(), enc.text_chunk("Hi"), enc.text_chunk(" there"),
                                               enc.finish_chunk("stop")]) + b"data: [DONE]\n\n"
    assert raw == expected
    two = ChatCompletionEncoder(script[0], n=2)
    assert two.text_frame("é\"", 1) == sse_frame(two.text_chunk("é\"", 1))


@pytest.mark.parametrize("script", [
    [msg("a", index=2)],  # a choice the request did not ask for
    [msg("a", finish=STOP), msg("b", index=0, finish=STOP)],  # n=2: choice 0 twice, choice 1 never
    [msg("a", index=1, finish=STOP)],  # the stream ends before choice 0's finish
])
async def test_a_broken_choice_sequence_is_an_error_not_a_short_answer(
        script: list[router_pb2.GenerateResponse]) -> None:
    status, raw, _ = await post(CHAT, {"model": "m", "messages": MESSAGES, "n": 2}, script)
    assert status == 500 and json.loads(raw)["error"]["type"] == "server_error"
    status, raw, _ = await post(CHAT, {"model": "m", "messages": MESSAGES, "n": 2, "stream": True}, script)
    assert status == 200
    last = sse_events(raw)[-1]
    assert isinstance(last, dict) and last["error"]["type"] == "server_error"


async def test_a_failed_finish_of_one_choice_fails_the_answer() -> None:
    script = [msg("a", index=0, finish=STOP), msg("b", index=1, finish=common_pb2.FINISH_REASON_ERROR)]
    status, raw, _ = await post(CHAT, {"model": "m", "messages": MESSAGES, "n": 2}, script)
    assert status == 500 and json.loads(raw)["error"]["message"] == "The generation failed."


def test_the_routes_are_the_request_models() -> None:
    assert GENERATION_ROUTES == {CHAT: ChatCompletionRequest, COMPLETIONS: CompletionRequest}
    with pytest.raises(GatewayError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "p", "max_tokens": 2,
                                          "min_tokens": 3}).to_generate_request()
    assert info.value.param == "min_tokens" and info.value.status == 400
