"""End to end, the OpenAI surface beyond plain text (issue 14), with the official ``openai`` SDK and the gRPC stubs
against the stack ``inferplane up`` starts: logprobs (against ``transformers``), ``n``, ``ignore_eos``, unknown
fields, structured output (json_object, strict json_schema) and forced tool calls, streamed and not.
"""

from __future__ import annotations

import json
import os
import re
from importlib.util import find_spec
from typing import Any

import grpc
import jsonschema
import openai
import pytest
import torch
from openai.lib.streaming.chat import ChatCompletionStreamState

from inferplane.assets import TINY_LLAMA
from inferplane.cli.launcher import LocalStack
from inferplane.tokenization.bundle import TokenizerBundle
from inferplane.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.conftest import require
from tests.openai_schema import validate

pytestmark = pytest.mark.e2e
MODEL = "tiny-llama"
PROMPT = "Return the number of"
MESSAGES = [{"role": "user", "content": "What does os.path.join do?"}]
LOGPROB_ATOL = 1e-4

# A strict schema the tiny model can finish within max_tokens: every string bounded, every number bounded.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone.",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 8}},
                   "required": ["tz"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}


@pytest.fixture(scope="module")
def client(stack: LocalStack, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=api_key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def hf_model() -> Any:
    require(find_spec("transformers") is not None, "transformers is not installed (test-only dependency)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaForCausalLM as HFLlama

    return HFLlama.from_pretrained(str(TINY_LLAMA), dtype=torch.float32).eval()


def grpc_generate(stack: LocalStack, api_key: str,
                  req: router_pb2.GenerateRequest) -> list[router_pb2.GenerateResponse]:
    with grpc.insecure_channel(stack.grpc_addr) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        return list(stub.Generate(req, metadata=(("authorization", f"Bearer {api_key}"),), timeout=120))


def test_logprobs_are_the_models_log_softmax(stack: LocalStack, api_key: str, client: openai.OpenAI,
                                             hf_model: Any) -> None:
    req = router_pb2.GenerateRequest(model=MODEL, prompt=PROMPT, max_tokens=12, logprobs=True, top_logprobs=5)
    req.sampling.temperature = 0
    msgs = grpc_generate(stack, api_key, req)
    entries = [e for m in msgs for e in m.logprobs]
    assert len(entries) == msgs[-1].usage.completion_tokens == 12
    prompt_ids = TokenizerBundle.from_dir(TINY_LLAMA).encode(PROMPT)
    ids = prompt_ids + [e.token_id for e in entries]
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [S, V]
    for i, e in enumerate(entries):
        row = ref[len(prompt_ids) - 1 + i]
        assert e.logprob == pytest.approx(float(row[e.token_id]), abs=LOGPROB_ATOL)
        values, top = torch.topk(row, 5)
        assert [t.token_id for t in e.top_logprobs] == top.tolist()
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(values.tolist(), abs=LOGPROB_ATOL)
    assert b"".join(e.bytes for e in entries).decode() == "".join(m.text for m in msgs)

    # REST, completions: the same numbers in OpenAI's legacy shape
    done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=5)
    validate(done.model_dump(exclude_unset=True), "CreateCompletionResponse")
    lp = done.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.token_logprobs == pytest.approx([e.logprob for e in entries], abs=LOGPROB_ATOL)
    assert [len(t) for t in lp.top_logprobs] == [5] * 12


def test_chat_logprobs_streamed_and_not_agree(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True,
                              top_logprobs=3)
    full = client.chat.completions.create(**kw)
    validate(full.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    content = full.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and all(len(c.top_logprobs) == 3 for c in content)
    assert "".join(c.token for c in content) == full.choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    for chunk in chunks:
        validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs
                for c in ch.choices[0].logprobs.content or []]
    assert [(c.token, c.bytes) for c in streamed] == [(c.token, c.bytes) for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=LOGPROB_ATOL)


def test_n_choices_and_usage_summing_them(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=3, temperature=1, seed=11,
                                          extra_body={"ignore_eos": True})
    validate(done.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert done.usage is not None and done.usage.completion_tokens == 18  # 3 choices x 6 tokens
    assert len({c.message.content for c in done.choices}) > 1  # each choice draws from its own seed
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=3, temperature=1,
                                                 seed=11, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    texts = {i: "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i)
             for i in range(3)}
    assert texts == {c.index: c.message.content for c in done.choices}  # seeded: the same choices
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 18


def test_ignore_eos_gives_exactly_max_tokens(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert done.usage is not None and done.usage.completion_tokens == 64
    assert done.choices[0].finish_reason == "length"


def test_an_unknown_field_is_a_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, extra_body={"colour": "red"})
    assert err.value.status_code == 400 and err.value.param == "colour"


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200, temperature=0,
                                          response_format={"type": "json_object"})
    if done.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(done.choices[0].message.content or ""), dict)
    else:  # cut by max_tokens: still a prefix of a JSON object
        assert (done.choices[0].message.content or "").startswith("{")


def test_strict_json_schema_validates_on_100_seeded_samples(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    samples = []
    for batch in range(10):  # 10 requests x n=10 = 100 samples, each choice with its own seed
        done = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=120, temperature=1,
                                              seed=1000 + 10 * batch, n=10, response_format=fmt)  # type: ignore[arg-type]
        samples += [c.message.content or "" for c in done.choices if c.finish_reason == "stop"]
    assert len(samples) == 100
    for text in samples:
        jsonschema.validate(json.loads(text), PERSON)


def _check_calls(calls: list[Any], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_validate_streamed_and_not(client: openai.OpenAI, tool_choice: Any) -> None:
    kw: dict[str, Any] = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                              max_tokens=120, temperature=0, tools=[WEATHER, CLOCK], tool_choice=tool_choice)
    names = {"get_weather"} if isinstance(tool_choice, dict) else {"get_weather", "get_time"}
    done = client.chat.completions.create(**kw)
    validate(done.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    message = done.choices[0].message
    _check_calls(list(message.tool_calls or []), names)
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(**kw, stream=True):
        validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
        state.handle_chunk(chunk)
    assembled = state.get_final_completion().choices[0].message
    _check_calls(list(assembled.tool_calls or []), names)
    assert [(c.function.name, c.function.arguments) for c in assembled.tool_calls or []] == \
        [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    # the calls go back as an assistant turn, with a tool result: the conversation renders and generates
    follow = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, tools=[WEATHER, CLOCK],
                                            messages=[*kw["messages"], message.model_dump(exclude_none=True),
                                                      {"role": "tool", "tool_call_id": (message.tool_calls or [])[0].id,
                                                       "content": "18 C, clear"}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_grpc_constraint_and_n(stack: LocalStack, api_key: str) -> None:
    req = router_pb2.GenerateRequest(model=MODEL, prompt=PROMPT, max_tokens=60, n=2,
                                     constraint=common_pb2.Constraint(regex=r"[0-9]{3}-[a-z]{2}"))
    req.sampling.temperature = 1
    req.sampling.seed = 5
    msgs = grpc_generate(stack, api_key, req)
    texts = {i: "".join(m.text for m in msgs if m.index == i) for i in range(2)}
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", t) for t in texts.values()), texts
    assert msgs[-1].HasField("usage") and sum(1 for m in msgs if m.HasField("usage")) == 1
