"""End to end: the official anthropic client → Envoy → REST edge (/v1/messages) → router → executor (Triton)."""

from __future__ import annotations

import time

import anthropic
import httpx
import pytest
from anthropic.types import Message, RawMessageStreamEvent

from inferplane.cli.launcher import LocalStack
from tests.e2e.test_openai_client import _usage

pytestmark = pytest.mark.e2e
MODEL = "tiny-llama"
# The newest SDK has no sampling arguments; older ones and curl send them, and the server honours them.
GREEDY = {"temperature": 0}
MESSAGES: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Return the absolute path of a file."}]


def _root(stack: LocalStack) -> str:
    return stack.base_url.removesuffix("/v1")  # the SDK adds /v1/messages itself


@pytest.fixture(scope="module")
def client(stack: LocalStack, api_key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=_root(stack), api_key=api_key, max_retries=0, timeout=120)


def total_input(message: Message) -> int:
    """The prompt's tokens: those computed (input_tokens) and those read from the prefix cache."""
    return message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)


def test_create_and_stream_agree(client: anthropic.Anthropic) -> None:
    full = client.messages.create(model=MODEL, max_tokens=24, messages=MESSAGES, extra_body=GREEDY,
                                  system="You are terse.")
    assert isinstance(full, Message)
    assert full.id.startswith("msg_") and full.type == "message" and full.role == "assistant"
    assert full.model == MODEL and full.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in full.content] == ["text"]
    assert full.usage.input_tokens > 0 and 0 < full.usage.output_tokens <= 24

    with client.messages.stream(model=MODEL, max_tokens=24, messages=MESSAGES, extra_body=GREEDY,
                                system="You are terse.") as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == full.content[0].text  # type: ignore[union-attr]
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == full.stop_reason
    assert final.usage.output_tokens == full.usage.output_tokens
    # from message_delta's usage; the second request may read the first's prompt blocks from the prefix cache, which
    # Anthropic's usage counts apart from input_tokens (docs/prefix-cache.md)
    assert total_input(final) == total_input(full)


def test_raw_events_come_in_anthropic_order(client: anthropic.Anthropic) -> None:
    events: list[RawMessageStreamEvent] = list(client.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES,
                                                                      stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) <= {"ping", "content_block_delta"}
    delta = events[-2]
    assert delta.type == "message_delta" and delta.delta.stop_reason in ("end_turn", "max_tokens")
    assert delta.usage.output_tokens > 0


@pytest.mark.asyncio
async def test_async_client(stack: LocalStack, api_key: str) -> None:
    async with anthropic.AsyncAnthropic(base_url=_root(stack), api_key=api_key, max_retries=0, timeout=120) as aclient:
        msg = await aclient.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
        async with aclient.messages.stream(model=MODEL, max_tokens=8, messages=MESSAGES) as stream:
            final = await stream.get_final_message()
    assert msg.usage.output_tokens > 0 and final.usage.output_tokens > 0


def test_stop_sequence_is_reported(client: anthropic.Anthropic) -> None:
    base = client.messages.create(model=MODEL, max_tokens=24, messages=MESSAGES, extra_body=GREEDY)
    text = base.content[0].text  # type: ignore[union-attr]
    words = [w for w in text.split(" ") if len(w) >= 3]
    if not words:
        pytest.skip(f"greedy text has no word to stop at: {text!r}")
    stop = words[len(words) // 2]
    cut = client.messages.create(model=MODEL, max_tokens=24, messages=MESSAGES, extra_body=GREEDY,
                                 stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]  # type: ignore[union-attr]
    with client.messages.stream(model=MODEL, max_tokens=24, messages=MESSAGES, extra_body=GREEDY,
                                stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_bad_key_is_401_in_anthropic_shape(stack: LocalStack) -> None:
    secret = "sk-ip-nosuchkey000-" + "x" * 43
    bad = anthropic.Anthropic(base_url=_root(stack), api_key=secret, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        bad.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
    assert err.value.status_code == 401
    assert err.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                         "message": err.value.body["error"]["message"]}}  # type: ignore[index]
    assert "x" * 43 not in err.value.response.text


def test_unknown_model_is_404(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="no-such-model", max_tokens=8, messages=MESSAGES)
    assert err.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


@pytest.mark.parametrize(("extra", "field"), [({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tools"),
                                             ({"frobnicate": 1}, "frobnicate")])
def test_refused_fields_are_400_naming_them(client: anthropic.Anthropic, extra: dict[str, object], field: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES, extra_body=extra)
    error = err.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(f"{field}:")


def test_missing_max_tokens_is_400(stack: LocalStack, api_key: str) -> None:
    resp = httpx.post(f"{stack.base_url}/messages", headers={"x-api-key": api_key, "anthropic-version": "2023-06-01"},
                      json={"model": MODEL, "messages": MESSAGES}, timeout=30)
    assert resp.status_code == 400
    assert resp.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                      "message": "max_tokens: Field required"}}


def test_count_tokens_matches_the_generation_usage(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=MODEL, messages=MESSAGES, system="You are terse.")
    used = client.messages.create(model=MODEL, max_tokens=1, messages=MESSAGES, system="You are terse.")
    assert counted.input_tokens == total_input(used) > 0
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=MESSAGES)


def test_each_message_is_metered_as_a_chat(client: anthropic.Anthropic, stack: LocalStack) -> None:
    told = {}
    for stream in (False, True):
        rid = f"e2e-anthropic-usage-{int(stream)}"
        raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=6, messages=MESSAGES, stream=stream,
                                                       extra_headers={"x-request-id": rid})
        assert raw.headers["x-request-id"] == rid
        parsed = raw.parse()
        if stream:
            usage = next(e.usage for e in parsed if e.type == "message_delta")  # type: ignore[union-attr]
        else:
            usage = parsed.usage  # type: ignore[union-attr]
        told[rid] = (usage.input_tokens, usage.output_tokens)
    deadline = time.monotonic() + 60
    for rid, (input_tokens, output_tokens) in told.items():
        while not (records := _usage(stack, rid)):
            assert time.monotonic() < deadline, f"no usage record for {rid}"
            time.sleep(0.2)
        assert len(records) == 1 and records[0].model == MODEL
        assert (records[0].prompt_tokens, records[0].completion_tokens) == (input_tokens, output_tokens)
