"""A hypothesis fuzz of the JSON bodies of ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/v1/responses``, ``/v1/messages`` (Anthropic's), ``/tokenize`` and ``/detokenize`` against the real gateway
(uvicorn on a port) in front of a real ``Router`` and real metering.

Bodies are built field by field: each field is either a value of its own type or anything JSON (wrong types,
huge and negative integers, floats past float64 and the NaN/Infinity literals, long and unicode strings, lone
surrogate escapes). The contract: no answer is a 5xx, and every 4xx is OpenAI's error shape (Anthropic's on
``/v1/messages``), with a ``param`` when the body was refused field by field. No executor listens, so a body that
passes every check ends at the router's 503 ``service_unavailable`` (the one 5xx allowed, and only with that
code): it was accepted, which is all this test is about. The bodies of the generation routes are sent in both
stream modes.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferplane.common.settings import ServerSettings
from inferplane.gateway.main import GatewayServer, GatewaySettings
from inferplane.router.main import Router
from inferplane.router.settings import RouterSettings
from tests.integration.test_admission import Metering, metering  # noqa: F401  (fixture)
from tests.openai_schema import validate

EXAMPLES = 200  # per route: 1,000 requests, well under a minute on two cores
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages", "/tokenize",
          "/detokenize")
ANTHROPIC_ROUTES = ("/v1/messages",)
# The same answer in Anthropic's words (its "service unavailable" is 529 overloaded_error).
ANTHROPIC_ACCEPTED = (529, "overloaded_error")
# The router's answer when no executor serves the model: the body passed every check.
ACCEPTED = (503, "service_unavailable")


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'metering.db'}"


@pytest_asyncio.fixture
async def gateway(metering: Metering, tmp_path: Path) -> AsyncIterator[str]:  # noqa: F811
    metering_addr = f"127.0.0.1:{metering.server.port}"
    router = Router(RouterSettings(server=ServerSettings(port=0, grace_seconds=0), metering_addr=metering_addr,
                                   executor_addrs=["127.0.0.1:9"], outbox_path=tmp_path / "outbox.db",
                                   request_timeout_s=10))
    router.outbox.start()
    await router.server.start()
    server = GatewayServer(GatewaySettings(port=0, router_addr=f"127.0.0.1:{router.server.port}",
                                           metering_addr=metering_addr, request_timeout_s=10, grace_seconds=0),
                           handle_signals=False)
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.wait_for(server.ready.wait(), 30)
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        await router.stop(0)


# --- strategies ---------------------------------------------------------------------------------------

# Any JSON value, small: the wrong-type alternative of every field.
_json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                 | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
any_json = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
# Numbers at and past every boundary: int32, int64, float64 overflow, and the non-JSON literals (as raw tokens).
# Out of range first: hypothesis draws the first elements of a sampled list more often.
boundary_ints = st.sampled_from([10**12, 2**31, 2**63, -(2**63) - 1, 10**30, 2**32, -(2**31) - 1, -1, 0, 21, 129,
                                 2**31 - 1, 2**63 - 1, -(2**63), 1, 2, 20, 128])
edge_ints = boundary_ints | st.integers()
edge_floats = st.sampled_from([1e308, -1e308, 2.0000001, -1.0, 1e39, 0.0, -0.0, 1e-320, 0.5, 1.0, 2.0]) | st.floats(
    allow_nan=False, allow_infinity=False)
RAW = "\ue001raw:"  # marks a raw JSON token to splice into the body text (NaN, Infinity, 1e400, bad escapes)
raw_numbers = st.sampled_from(["NaN", "Infinity", "1e400", "-Infinity", "-1e400", "1.0e2", "1E-400"]).map(
    lambda t: RAW + t)
number = st.one_of(boundary_ints, raw_numbers, edge_floats, st.integers())
unicode_text = st.text(max_size=200) | st.sampled_from(["", "\x00", "é" * 300, "😀" * 50, RAW + '"\\ud800"',
                                                        RAW + '"\\udc00x"', "a" * 5000])


# Valid values of each field, and the wild ones that replace one or two of them in a body.
wild = number | any_json | unicode_text
text_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": unicode_text}), min_size=1, max_size=3)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
                                 "content": unicode_text | text_parts}, optional={"name": unicode_text})
# A JSON Schema of a few properties (valid ones and odd ones: the executor compiles it, none listens here).
small_schema = st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(
    st.text(min_size=1, max_size=8), st.sampled_from([{"type": "string"}, {"type": "integer"}, {"enum": ["a", 1]},
                                                      {"type": "array", "items": {"type": "boolean"}}]), max_size=3)},
    optional={"additionalProperties": st.booleans(), "required": st.lists(st.text(max_size=8), max_size=2)})
function_tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.from_regex(r"[a-z_]{1,12}", fullmatch=True)},
    optional={"description": unicode_text, "parameters": small_schema, "strict": st.booleans()})})
response_format = (st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})
                   | st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
                       {"name": st.from_regex(r"[a-z]{1,8}", fullmatch=True)},
                       optional={"schema": small_schema, "strict": st.booleans()})}))
generation_fields: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(1, 64), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "seed": st.integers(-(2**63), 2**63 - 1), "n": st.integers(1, 4), "stop": st.lists(unicode_text, max_size=4),
    "stream": st.booleans(), "user": unicode_text, "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "logit_bias": st.dictionaries(st.integers(0, 5000).map(str),
                                                                         st.floats(-100, 100), max_size=3),
    "response_format": response_format, "top_k": st.integers(-1, 50), "min_tokens": st.integers(0, 4),
    "ignore_eos": st.booleans(), "repetition_penalty": st.floats(0.1, 2)}
chat_fields: dict[str, st.SearchStrategy[Any]] = {
    **generation_fields, "max_completion_tokens": st.integers(1, 64), "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20), "tools": st.lists(function_tool, max_size=3),
    "tool_choice": st.sampled_from(["none", "auto", "required"]) | st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.from_regex(r"[a-z_]{1,12}",
                                                                                                fullmatch=True)})}),
    "parallel_tool_calls": st.booleans()}
response_input = unicode_text | st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant"]),
                           "content": unicode_text})
    | st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": unicode_text,
                             "output": unicode_text}), min_size=1, max_size=3)
anthropic_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                           "content": unicode_text | st.lists(st.fixed_dictionaries(
                                               {"type": st.just("text"), "text": unicode_text}), max_size=2)})
ENDPOINTS: dict[str, tuple[dict[str, st.SearchStrategy[Any]], dict[str, st.SearchStrategy[Any]]]] = {
    # route: (required fields, optional fields), each with its valid values
    "/v1/chat/completions": ({"model": st.just("tiny-llama"), "messages": st.lists(message, min_size=1, max_size=3)},
                             chat_fields),
    "/v1/completions": ({"model": st.just("tiny-llama"), "prompt": unicode_text | st.lists(unicode_text, max_size=1)},
                        {**generation_fields, "logprobs": st.integers(0, 5)}),
    "/v1/responses": ({"model": st.just("tiny-llama"), "input": response_input},
                      {"instructions": unicode_text, "max_output_tokens": st.integers(16, 64),
                       "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "stream": st.booleans(),
                       "store": st.just(False), "tools": st.lists(function_tool.map(
                           lambda t: {"type": "function", **t["function"]}), max_size=2),
                       "tool_choice": st.sampled_from(["none", "auto", "required"]),
                       "text": st.fixed_dictionaries({"format": st.fixed_dictionaries(
                           {"type": st.sampled_from(["text", "json_object"])})})}),
    "/v1/messages": ({"model": st.just("tiny-llama"), "max_tokens": st.integers(1, 64),
                      "messages": st.lists(anthropic_message, min_size=1, max_size=3)},
                     {"system": unicode_text, "temperature": st.floats(0, 1), "top_p": st.floats(0.01, 1),
                      "top_k": st.integers(0, 50), "stop_sequences": st.lists(unicode_text, max_size=3),
                      "stream": st.booleans()}),
    "/v1/embeddings": ({"model": st.just("all-minilm-l6-v2"),
                        "input": st.text(min_size=1, max_size=50) | st.lists(st.text(min_size=1), min_size=1,
                                                                            max_size=4)},
                       {"encoding_format": st.sampled_from(["float", "base64"]), "user": unicode_text}),
    "/tokenize": ({"model": st.just("tiny-llama")},
                  {"prompt": unicode_text, "messages": st.lists(message, min_size=1, max_size=3),
                   "add_special_tokens": st.booleans(), "add_generation_prompt": st.booleans(),
                   "return_token_strs": st.booleans()}),
    "/detokenize": ({"model": st.just("tiny-llama"),
                     "tokens": st.lists(st.integers(0, 600) | boundary_ints, max_size=20)}, {}),
}
# Fields a body may carry that the route does not define (OpenAI's, vLLM's, made up): each with any value.
OTHER_FIELDS = ["top_logprobs", "logprobs", "dimensions", "max_completion_tokens", "presence_penalty",
                "frequency_penalty", "logit_bias", "stream_options", "echo", "best_of", "suffix", "model", "n",
                "unknown_field", ""]

_SAMPLING_NUMBERS = ["max_tokens", "temperature", "top_p", "seed", "n", "top_logprobs", "logprobs",
                     "presence_penalty", "frequency_penalty"]
# The fields a boundary number is put in, per route (its own numbers, and a few it does not define).
NUMERIC_FIELDS = {"/v1/chat/completions": [*_SAMPLING_NUMBERS, "max_completion_tokens", "min_tokens", "top_k",
                                           "repetition_penalty"],
                  "/v1/completions": _SAMPLING_NUMBERS, "/v1/embeddings": ["dimensions", "max_tokens"],
                  "/v1/responses": ["max_output_tokens", "temperature", "top_p", "top_logprobs"],
                  "/v1/messages": ["max_tokens", "temperature", "top_p", "top_k"],
                  "/tokenize": ["add_special_tokens", "max_tokens"], "/detokenize": ["tokens", "max_tokens"]}


@st.composite
def bodies(draw: st.DrawFn, route: str) -> Any:
    """A valid body with zero to two fields replaced by wild values (or, now and then, any JSON at all)."""
    if draw(st.integers(0, 19)) == 0:
        return draw(any_json)
    required, optional = ENDPOINTS[route]
    body = {name: draw(strategy) for name, strategy in required.items()}
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)) if optional else ():
        body[name] = draw(optional[name])
    if body.get("stream") and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    if draw(st.integers(0, 3)):  # a number at or past a boundary in a numeric field (the 10**12 max_tokens of issue 14)
        body[draw(st.sampled_from(NUMERIC_FIELDS[route]))] = draw(number)
    names = sorted({*required, *optional, *OTHER_FIELDS})
    for name in draw(st.lists(st.sampled_from(names), max_size=1)):
        body[name] = draw(wild)
    return body


def render(body: Any) -> bytes:
    """The body as JSON text, with the raw tokens spliced in unquoted (json.dumps cannot write them)."""
    text = json.dumps(body, ensure_ascii=False)
    out = text
    for token in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1.0e2", "1E-400", '"\\ud800"', '"\\udc00x"'):
        out = out.replace(json.dumps(RAW + token, ensure_ascii=False), token)
    return out.encode("utf-8", "surrogatepass")


def check(route: str, body: Any, response: httpx.Response, seen: dict[int, int]) -> None:
    seen[response.status_code] = seen.get(response.status_code, 0) + 1
    status = response.status_code
    accepted = ANTHROPIC_ACCEPTED if route in ANTHROPIC_ROUTES else ACCEPTED
    assert status < 500 or status == accepted[0], f"{status} for {render(body)[:500]!r}: {response.text[:500]}"
    if status == 200:  # cannot happen without an executor; kept honest should one be added
        return
    payload = response.json()
    if route in ANTHROPIC_ROUTES:  # Anthropic's error shape: {"type": "error", "error": {"type", "message"}}
        assert payload["type"] == "error" and isinstance(payload["error"]["type"], str), response.text
        assert isinstance(payload["error"]["message"], str) and payload["error"]["message"], response.text
        assert status < 500 or payload["error"]["type"] == accepted[1], response.text
        return
    validate(payload, "ErrorResponse")
    error = payload["error"]
    if status >= 500:
        assert error["code"] == ACCEPTED[1], response.text
    else:
        assert 400 <= status < 500 and isinstance(error["message"], str) and error["message"], response.text
        assert not (isinstance(error["param"], float) and math.isnan(error["param"]))


async def test_fuzzed_bodies_are_never_a_server_error(gateway: str, metering: Metering,  # noqa: F811
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _, key = metering.store.create_key("fuzz")
    seen: dict[int, int] = {}
    count = 0

    def fuzz(route: str) -> None:
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(body=bodies(route))
        def one(body: Any) -> None:
            nonlocal count
            count += 1
            response = client.post(route, content=render(body), headers={"content-type": "application/json"})
            check(route, body, response, seen)

        one()

    with httpx.Client(base_url=gateway, timeout=30, headers={"authorization": f"Bearer {key}"}) as client:
        for route in ROUTES:
            await asyncio.to_thread(fuzz, route)
    with capsys.disabled():
        print(f"\nfuzz: {count} bodies over {len(ROUTES)} routes, statuses {dict(sorted(seen.items()))}")
    assert count >= len(ROUTES) * EXAMPLES


# Every numeric field of every route at and past its bounds, each alone in an otherwise valid body: (route, field,
# value as JSON text, the param of the 400, or None when the value is in range and the body is accepted).
VALID = {"/v1/chat/completions": '"model":"tiny-llama","messages":[{"role":"user","content":"hi"}]',
         "/v1/completions": '"model":"tiny-llama","prompt":"hi"',
         "/v1/embeddings": '"model":"all-minilm-l6-v2","input":"hi"', "/detokenize": '"model":"tiny-llama"'}
GENERATION_BOUNDS = [("max_tokens", "1000000000000", False), ("max_tokens", "2147483648", False),
                     ("max_tokens", "0", False), ("max_tokens", "-1", False), ("max_tokens", "1e400", False),
                     ("max_tokens", "64", True), ("temperature", "NaN", False), ("temperature", "Infinity", False),
                     ("temperature", "-Infinity", False), ("temperature", "1e400", False),
                     ("temperature", "-0.1", False),
                     ("temperature", "2.0", True), ("top_p", "NaN", False), ("top_p", "0", False),
                     ("top_p", "1.0000001", False), ("top_p", "1", True),
                     ("seed", "9223372036854775808", False), ("seed", "-9223372036854775809", False),
                     ("seed", "9223372036854775807", True), ("seed", "-9223372036854775808", True),
                     ("seed", "1e30", False), ("n", "2147483648", False), ("n", "0", False), ("n", "-1", False)]
RANGE_CASES = [*((route, f, v, ok) for route in ("/v1/chat/completions", "/v1/completions")
                 for f, v, ok in GENERATION_BOUNDS),
               ("/v1/chat/completions", "max_completion_tokens", "1000000000000", False),
               ("/v1/chat/completions", "max_completion_tokens", "-5", False),
               ("/v1/embeddings", "dimensions", "1000000000000", False),
               ("/v1/embeddings", "dimensions", "0", False), ("/v1/embeddings", "dimensions", "NaN", False),
               ("/detokenize", "tokens", "[1000000000000]", False), ("/detokenize", "tokens", "[-1]", False),
               ("/detokenize", "tokens", "[NaN]", False)]


async def test_every_number_is_range_checked(gateway: str, metering: Metering) -> None:  # noqa: F811
    _, key = metering.store.create_key("ranges")
    async with httpx.AsyncClient(base_url=gateway, timeout=30, headers={"authorization": f"Bearer {key}"}) as client:
        for route, name, value, in_range in RANGE_CASES:
            raw = f'{{{VALID[route]},"{name}":{value}}}'
            response = await client.post(route, content=raw, headers={"content-type": "application/json"})
            if in_range:  # accepted: it reached the router, which has no executor
                assert (response.status_code, response.json()["error"]["code"]) == ACCEPTED, (raw, response.text)
                continue
            assert response.status_code == 400, (raw, response.text)
            validate(response.json(), "ErrorResponse")
            expected = f"{name}[0]" if value.startswith("[") else name  # a list's bad element is named by index
            assert response.json()["error"]["param"] == expected, (raw, response.text)

