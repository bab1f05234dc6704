"""End to end: the official openai client's Responses API → Envoy → REST edge (/v1/responses) → router → executor
(Triton). Every response object and stream event is checked against OpenAI's OpenAPI description too."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.responses import Response

from inferplane.cli.launcher import LocalStack
from tests.e2e.test_openai_client import _usage
from tests.openai_schema import validate

pytestmark = pytest.mark.e2e
MODEL = "tiny-llama"
INPUT = "Return the absolute path of a file."
GREEDY: dict[str, Any] = {"temperature": 0}


@pytest.fixture(scope="module")
def client(stack: LocalStack, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=api_key, max_retries=0, timeout=120)


def _checked(response: Response) -> Response:
    validate(response.model_dump(mode="json", exclude_unset=True, by_alias=True), "Response")
    return response


def test_create_and_stream_agree(client: openai.OpenAI) -> None:
    full = _checked(client.responses.create(model=MODEL, instructions="You are terse.", input=INPUT,
                                            max_output_tokens=24, store=False, **GREEDY))
    assert full.id.startswith("resp_") and full.object == "response" and full.model == MODEL
    assert full.status in ("completed", "incomplete") and full.output_text
    assert [o.type for o in full.output] == ["message"]
    assert full.usage is not None and full.usage.input_tokens > 0 and 0 < full.usage.output_tokens <= 24
    assert full.usage.total_tokens == full.usage.input_tokens + full.usage.output_tokens

    with client.responses.stream(model=MODEL, instructions="You are terse.", input=INPUT, max_output_tokens=24,
                                 store=False, **GREEDY) as stream:
        events = list(stream)
    # get_final_response() is for a `response.completed` only (the SDK's rule): an incomplete one ends the stream
    # with `response.incomplete`, which carries the response as well
    final = events[-1].response  # type: ignore[union-attr]
    for event in events:
        validate(event.model_dump(mode="json", exclude_unset=True), "ResponseStreamEvent")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events][:2] == ["response.created", "response.in_progress"]
    assert events[-1].type == f"response.{full.status}"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == full.output_text
    assert final.status == full.status and final.usage is not None
    assert final.usage.output_tokens == full.usage.output_tokens and final.usage.input_tokens == full.usage.input_tokens


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    cut = _checked(client.responses.create(model=MODEL, input=INPUT, max_output_tokens=16, store=False,
                                           instructions="Write a long essay.", **GREEDY))
    if cut.status == "completed":
        pytest.skip(f"the model ended its turn within 16 tokens: {cut.output_text!r}")
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage is not None and cut.usage.output_tokens == 16


def test_previous_response_id_continues_and_retrieve_returns_it(client: openai.OpenAI) -> None:
    first = _checked(client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=16, **GREEDY))
    assert _checked(client.responses.retrieve(first.id)).output_text == first.output_text
    second = _checked(client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=16,
                                              previous_response_id=first.id, **GREEDY))
    alone = client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=16, store=False,
                                    **GREEDY)
    assert second.previous_response_id == first.id
    # the continuation carries the first turn: more prompt tokens than the same question alone
    assert second.usage is not None and alone.usage is not None and first.usage is not None
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_refusals_are_openai_400s(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input=INPUT, reasoning={"effort": "low"})
    assert err.value.param == "reasoning"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input=INPUT, tools=[{"type": "web_search"}])
    assert err.value.param == "tools[0]"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input=INPUT)


def test_each_response_is_metered_as_a_chat(client: openai.OpenAI, stack: LocalStack) -> None:
    told = {}
    for stream in (False, True):
        rid = f"e2e-responses-usage-{int(stream)}"
        raw = client.responses.with_raw_response.create(model=MODEL, input=INPUT, max_output_tokens=16,
                                                        store=False, stream=stream,
                                                        extra_headers={"x-request-id": rid})
        assert raw.headers["x-request-id"] == rid
        parsed: Any = raw.parse()
        final = parsed if not stream else [e for e in parsed][-1].response
        assert final.id == f"resp_{rid}" and final.usage is not None
        told[rid] = (final.usage.input_tokens, final.usage.output_tokens)
    records = _usage(stack, set(told))
    assert {r.request_id: (r.prompt_tokens, r.completion_tokens) for r in records} == told
    assert all(r.model == MODEL for r in records)


WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                   "unit": {"type": "string", "enum": ["c", "f"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
WEATHER_TOOL: Any = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
                     "parameters": WEATHER_PARAMS, "strict": True}


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_function_call_comes_back_as_a_function_call_item(client: openai.OpenAI, stream: bool) -> None:
    kw: dict[str, Any] = dict(model=MODEL, input="Weather in Paris?", tools=[WEATHER_TOOL], tool_choice="required",
                              max_output_tokens=120, store=False, **GREEDY)
    if stream:
        with client.responses.stream(**kw) as events:
            for event in events:
                validate(event.model_dump(mode="json", exclude_unset=True), "ResponseStreamEvent")
            response = _checked(events.get_final_response())
    else:
        response = _checked(client.responses.create(**kw))
    calls = [o for o in response.output if o.type == "function_call"]
    assert calls and all(c.name == "get_weather" and c.call_id for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
    # the call and its output go back as input: the conversation continues
    follow = _checked(client.responses.create(
        model=MODEL, tools=[WEATHER_TOOL], max_output_tokens=16, store=False, **GREEDY,
        input=[{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name,
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C, clear"}]))
    assert follow.status in ("completed", "incomplete")


def test_text_format_json_schema_validates(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    response = _checked(client.responses.create(
        model=MODEL, input="A person, as JSON.", max_output_tokens=80, store=False, temperature=1,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}}))
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)
