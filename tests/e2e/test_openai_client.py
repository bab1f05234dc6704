"""End to end: the official openai client → gateway → router → tokenizer/executor(Triton)/metering."""

from __future__ import annotations

import time

import grpc
import httpx
import openai
import pytest

from inferplane.cli.launcher import LocalStack, read_env
from inferplane.v1 import common_pb2, metering_pb2, metering_pb2_grpc, router_pb2, router_pb2_grpc
from tests.openai_schema import validate

pytestmark = pytest.mark.e2e
MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Return the absolute path of a file."}]


@pytest.fixture(scope="module")
def client(stack: LocalStack, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=api_key, max_retries=0, timeout=120)


def test_local_env_file_names_the_stack(stack: LocalStack, api_key: str) -> None:
    env = read_env(stack.state / "local.env")
    assert env["INFERPLANE_BASE_URL"] == stack.base_url and env["INFERPLANE_BASE_URL"].endswith("/v1")
    assert env["INFERPLANE_GRPC_ADDR"] == stack.grpc_addr
    assert env["INFERPLANE_API_KEY"] == api_key


def test_models_list_shows_the_catalog(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "all-minilm-l6-v2", "minilm-raw"]  # minilm-raw: KServe v2 only
    validate(models.model_dump(), "ListModelsResponse")


def test_stream_and_non_stream_agree_with_usage(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0, seed=7)
    validate(full.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    assert full.usage is not None and full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                                 seed=7, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    # the second request may reuse the first's prompt blocks from the prefix cache (docs/prefix-cache.md): all
    # counts agree but cached_tokens, which can only have grown
    streamed, plain = last.usage.model_dump(), full.usage.model_dump()
    assert streamed.pop("prompt_tokens_details")["cached_tokens"] >= plain.pop("prompt_tokens_details")["cached_tokens"]
    assert streamed == plain
    assert len({c.id for c in chunks}) == 1


def test_max_tokens_is_honoured_and_reported(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="The os module", max_tokens=5, temperature=0)
    validate(resp.model_dump(exclude_unset=True), "CreateCompletionResponse")
    assert resp.usage is not None
    assert resp.usage.completion_tokens <= 5
    if resp.choices[0].finish_reason == "length":
        assert resp.usage.completion_tokens == 5


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def once() -> str:
        r = client.completions.create(model=MODEL, prompt="Return a", max_tokens=16, temperature=0.9, top_p=0.9,
                                      seed=1234)
        return r.choices[0].text

    assert once() == once()


def test_stop_sequence_cuts_the_text(client: openai.OpenAI) -> None:
    base = client.completions.create(model=MODEL, prompt="Return the", max_tokens=24, temperature=0)
    text = base.choices[0].text
    words = [w for w in text.split(" ") if len(w) >= 3]
    if not words:
        pytest.skip(f"greedy text has no word to stop at: {text!r}")
    stop = words[len(words) // 2]
    cut = client.completions.create(model=MODEL, prompt="Return the", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    assert stop not in cut.choices[0].text


def test_bad_key_is_401(stack: LocalStack) -> None:
    bad = openai.OpenAI(base_url=stack.base_url, api_key="sk-ip-nosuchkey000-" + "x" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model=MODEL, messages=MESSAGES)
    body = err.value.response.json()
    validate(body, "ErrorResponse")
    assert err.value.status_code == 401 and body["error"]["code"] == "invalid_api_key"
    assert "x" * 43 not in err.value.response.text


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    body = err.value.response.json()
    validate(body, "ErrorResponse")
    assert body["error"]["code"] == "model_not_found"


def test_negative_max_tokens_is_400(stack: LocalStack, api_key: str) -> None:
    resp = httpx.post(f"{stack.base_url}/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": MODEL, "messages": MESSAGES, "max_tokens": -1}, timeout=30)
    assert resp.status_code == 400
    validate(resp.json(), "ErrorResponse")
    assert resp.json()["error"]["param"] == "max_tokens"


def test_grpc_stream_with_generated_stubs(stack: LocalStack, api_key: str) -> None:
    with grpc.insecure_channel(stack.grpc_addr) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        req = router_pb2.GenerateRequest(model=MODEL, chat=router_pb2.ChatInput(messages=[
            common_pb2.ChatMessage(role="user", content=MESSAGES[0]["content"])]), max_tokens=16)
        req.sampling.temperature = 0
        call = stub.Generate(req, metadata=(("authorization", f"Bearer {api_key}"),), timeout=120)
        msgs = list(call)
        assert dict(call.initial_metadata())["x-request-id"] == msgs[0].request_id
    assert msgs[-1].finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert msgs[-1].usage.completion_tokens == sum(m.token_count for m in msgs)
    assert "".join(m.text for m in msgs)


def test_grpc_bad_key_is_unauthenticated(stack: LocalStack) -> None:
    with grpc.insecure_channel(stack.grpc_addr) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(router_pb2.GenerateRequest(model=MODEL, prompt="x"),
                               metadata=(("authorization", "Bearer nope"),), timeout=30))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _usage(stack: LocalStack, request_ids: set[str]) -> list[metering_pb2.UsageRecord]:
    """The ledger's records of ``request_ids``, once each has one (the router's outbox delivers in batches, a
    fraction of a second after the response): a generous deadline, then whatever is there."""
    admin = (("authorization", f"Bearer {stack.create_admin_key()}"),)
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports['metering']}") as channel:
        stub = metering_pb2_grpc.MeteringServiceStub(channel)
        while True:
            records = [r for r in stub.ListUsage(metering_pb2.ListUsageRequest(limit=1000), timeout=10,
                                                 metadata=admin).records if r.request_id in request_ids]
            if {r.request_id for r in records} == request_ids or time.monotonic() > deadline:
                return records
            time.sleep(0.2)


def test_each_request_leaves_one_usage_record_matching_the_client(stack: LocalStack, api_key: str) -> None:
    told = {}
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120) as http:
        for i in range(4):
            rid = f"e2e-usage-{i}"
            body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8 + i, "temperature": 0}
            resp = http.post("/chat/completions", json=body, headers={"x-request-id": rid})
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-request-id"] == rid
            told[rid] = resp.json()["usage"]
        # the same request id again: the ledger keeps the first record only
        again = http.post("/chat/completions", headers={"x-request-id": "e2e-usage-0"},
                          json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "temperature": 0})
        assert again.status_code == 200
    _usage(stack, set(told))
    time.sleep(1.0)  # a second record of e2e-usage-0, had anything kept one, would have been delivered by now
    ledger = _usage(stack, set(told))
    for rid, usage in told.items():
        records = [r for r in ledger if r.request_id == rid]
        assert len(records) == 1, rid
        assert (records[0].prompt_tokens, records[0].completion_tokens) == (usage["prompt_tokens"],
                                                                            usage["completion_tokens"])
