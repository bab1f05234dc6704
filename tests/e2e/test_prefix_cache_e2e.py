"""End to end: prefix caching seen by a client and billed by the ledger (docs/prefix-cache.md).

The same long system prompt is sent twice through Envoy → gateway → router → executor → Triton's LLM: the first
request computes it (``cached_tokens`` 0), the second reuses its full blocks (``cached_tokens`` the whole blocks
before the last prompt token), in non-streamed and streamed chat completions, the Responses API and Anthropic's
messages; each usage record carries those tokens and costs them at the catalog's cached-input price, exactly.
"""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from inferplane.assets import CATALOG
from inferplane.cli.launcher import LocalStack
from inferplane.common.catalog import load_catalog
from inferplane.metering.secret import load_secret
from inferplane.metering.store import MeteringStore
from tests.e2e.test_openai_client import _usage

pytestmark = pytest.mark.e2e
MODEL = "tiny-llama"
BLOCK = 16  # the catalog's prefix_block_size for tiny-llama (the default)


def system_prompt() -> str:
    # a nonce first, so that no earlier request of the session shares a block with this one
    nonce = uuid.uuid4().hex
    return (f"Session {nonce}. You are a careful assistant for the Python standard library. Answer with the name "
            "of the function first, then one sentence on what it returns, then one on the errors it raises. ") * 3


def reused(prompt_tokens: int) -> int:
    """The tokens a repeat of a prompt reuses: its whole blocks before its last token."""
    return (prompt_tokens - 1) // BLOCK * BLOCK


def test_the_same_system_prompt_twice_reuses_its_blocks_and_bills_them_cached(stack: LocalStack, api_key: str) -> None:
    catalog_model = load_catalog(CATALOG).get(MODEL)
    assert catalog_model is not None and catalog_model.prefix_block_size == BLOCK
    client = openai.OpenAI(base_url=stack.base_url, api_key=api_key, max_retries=0, timeout=120)
    messages = [{"role": "system", "content": system_prompt()}, {"role": "user", "content": "What does join do?"}]
    ids = {name: f"prefix-{name}-{uuid.uuid4().hex[:8]}" for name in ("cold", "warm", "stream", "other")}

    def chat(name: str, msgs: list[dict[str, str]]) -> openai.types.CompletionUsage:
        reply = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,  # type: ignore[arg-type]
                                               extra_headers={"x-request-id": ids[name]})
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        return reply.usage

    cold = chat("cold", messages)
    assert cold.prompt_tokens > 3 * BLOCK
    assert cold.prompt_tokens_details is not None and cold.prompt_tokens_details.cached_tokens == 0
    warm = chat("warm", messages)
    assert warm.prompt_tokens == cold.prompt_tokens
    assert warm.prompt_tokens_details is not None
    assert warm.prompt_tokens_details.cached_tokens == reused(warm.prompt_tokens) > 0

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_headers={"x-request-id": ids["stream"]}))
    streamed = chunks[-1].usage
    assert streamed is not None and streamed.prompt_tokens_details is not None
    assert streamed.prompt_tokens_details.cached_tokens == reused(streamed.prompt_tokens)

    # another question after the same system prompt: the blocks they share, a multiple of the block size
    other = chat("other", [messages[0], {"role": "user", "content": "And what does split return?"}])
    assert other.prompt_tokens_details is not None
    shared = other.prompt_tokens_details.cached_tokens
    assert shared % BLOCK == 0 and 0 < shared <= other.prompt_tokens - 1

    # the Responses API and Anthropic's messages report the same reuse in their own fields
    root = stack.base_url.removesuffix("/v1")
    auth = {"authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=root, timeout=120, headers=auth) as http:
        resp = http.post("/v1/responses", json={"model": MODEL, "instructions": messages[0]["content"],
                                               "input": "What does join do?", "max_output_tokens": 16,
                                               "temperature": 0})
        assert resp.status_code == 200, resp.text
        usage = resp.json()["usage"]
        first = usage["input_tokens_details"]["cached_tokens"]
        resp = http.post("/v1/responses", json={"model": MODEL, "instructions": messages[0]["content"],
                                               "input": "What does join do?", "max_output_tokens": 16,
                                               "temperature": 0})
        usage = resp.json()["usage"]
        assert usage["input_tokens_details"]["cached_tokens"] == reused(usage["input_tokens"]) >= first
        body = {"model": MODEL, "system": messages[0]["content"], "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "What does join do?"}]}
        http.post("/v1/messages", json=body)
        msg = http.post("/v1/messages", json=body)
        assert msg.status_code == 200, msg.text
        anth = msg.json()["usage"]
        total = anth["input_tokens"] + anth["cache_read_input_tokens"]
        assert anth["cache_read_input_tokens"] == reused(total) > 0 and anth["cache_creation_input_tokens"] == 0

    # the ledger: cached tokens stored, and charged at the cached-input price of the record's price version
    records = {r.request_id: r for r in _usage(stack, set(ids.values()))}
    assert set(records) == set(ids.values())
    store = MeteringStore(f"sqlite:///{stack.state / 'metering.db'}",
                          load_secret(secret=None, secret_file=stack.state / "metering-secret"))
    try:
        prices = {p.price.version: p.price for p in store.price_history()}
    finally:
        store.close()
    expected = {"cold": 0, "warm": warm.prompt_tokens_details.cached_tokens, "other": shared,
                "stream": streamed.prompt_tokens_details.cached_tokens}
    for name, cached in expected.items():
        record = records[ids[name]]
        price = prices[record.price_version]
        assert price.cached_input_per_million is not None and price.cached_input < price.input_per_million
        assert record.cached_tokens == cached, name
        assert record.cost_nanodollars == price.cost(record.prompt_tokens, record.completion_tokens, cached), name
    assert records[ids["warm"]].cost_nanodollars < records[ids["cold"]].cost_nanodollars
