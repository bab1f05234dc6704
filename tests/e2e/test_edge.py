"""The edge in front of the real mesh: every e2e client goes through Envoy (``LocalStack.base_url`` and
``grpc_addr`` are Envoy's), the internal services are not reachable through it, long streams outlive its
request timeout, and oversize bodies stop there."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from inferplane.cli.launcher import LocalStack, free_port
from inferplane.edge.envoy import EdgeSettings, EnvoyProcess
from inferplane.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    metering_pb2,
    metering_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from tests.grpc_discovery import assert_public_api_discovered, discover
from tests.openai_schema import validate

pytestmark = pytest.mark.e2e
MODEL = "tiny-llama"


def wait_for_line(path: Path, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The edge's access log line for ``request_id`` (Envoy flushes the file about once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        found = [x for x in lines if x["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            assert found, f"no access log line for {request_id} in {path}"
            return found[-1]
        time.sleep(0.1)


def test_clients_reach_the_stack_through_the_edge(stack: LocalStack, api_key: str) -> None:
    edge = stack.ports["edge"]
    assert stack.base_url == f"http://127.0.0.1:{edge}/v1" and stack.grpc_addr == f"127.0.0.1:{edge}"
    assert {"gateway", "router"} <= set(stack.ports) and stack.ports["gateway"] != edge
    log = stack.state / "logs" / "edge-access.log"

    rid = f"edge-rest-{uuid.uuid4().hex[:8]}"
    client = openai.OpenAI(base_url=stack.base_url, api_key=api_key, max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, extra_headers={"x-request-id": rid})
    assert raw.headers["x-request-id"] == rid and raw.parse().usage is not None
    line = wait_for_line(log, rid)
    assert (line["upstream_cluster"], line["status"], line["path"]) == ("gateway", 200, "/v1/chat/completions")

    rid = f"edge-grpc-{uuid.uuid4().hex[:8]}"
    with grpc.insecure_channel(stack.grpc_addr) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        msgs = list(stub.Generate(router_pb2.GenerateRequest(model=MODEL, prompt="Return the", max_tokens=4),
                                  metadata=(("authorization", f"Bearer {api_key}"), ("x-request-id", rid)),
                                  timeout=60))
    assert msgs[0].request_id == rid
    line = wait_for_line(log, rid)
    assert (line["upstream_cluster"], line["grpc_status"], line["protocol"]) == ("router", 0, "HTTP/2")


def _internal_calls(channel: grpc.Channel) -> dict[str, Any]:
    """One real call on each internal service (and Triton), by name. Triton's: its model repository's index, which
    Triton answers and the edge's KServe v2 service (the router's) refuses, as it refuses all model control."""
    triton = channel.unary_unary("/inference.GRPCInferenceService/RepositoryIndex")
    return {
        "tokenizer": lambda: tokenizer_pb2_grpc.TokenizerServiceStub(channel).Encode(
            tokenizer_pb2.EncodeRequest(model=MODEL, text="hello"), timeout=10),
        "executor": lambda: executor_pb2_grpc.ExecutorServiceStub(channel).GetStatus(
            executor_pb2.GetStatusRequest(), timeout=10),
        "metering": lambda: metering_pb2_grpc.MeteringServiceStub(channel).ListPrices(  # a router call: no key
            metering_pb2.ListPricesRequest(), timeout=10),
        "triton_grpc": lambda: triton(b"", timeout=10),
    }


@pytest.mark.parametrize("service", ["tokenizer", "executor", "metering", "triton_grpc"])
def test_internal_grpc_services_are_unreachable_through_the_edge(stack: LocalStack, service: str) -> None:
    # Each answers on its own port ...
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports[service]}") as direct:
        _internal_calls(direct)[service]()
    # ... and not through the edge.
    with grpc.insecure_channel(stack.grpc_addr) as edge:
        with pytest.raises(grpc.RpcError) as err:
            _internal_calls(edge)[service]()
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_grpc_users_discover_the_public_api_at_the_edge(stack: LocalStack) -> None:
    """As ``grpcurl list`` / ``describe`` and a health probe would, through Envoy at the public port: reflection lists
    RouterService, the KServe v2 service (the router's), health and reflection only, describes them, and knows no
    internal service by name (the
    router's process imports their stubs); Health/Check answers SERVING."""
    assert_public_api_discovered(discover(stack.grpc_addr))


def test_tokenize_and_detokenize_through_the_edge(stack: LocalStack, api_key: str) -> None:
    edge_root = stack.base_url.removesuffix("/v1")
    auth = {"authorization": f"Bearer {api_key}"}
    client = openai.OpenAI(base_url=stack.base_url, api_key=api_key, max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Hi there"}]
    usage = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage  # type: ignore[arg-type]
    tokenized = httpx.post(f"{edge_root}/tokenize", json={"model": MODEL, "messages": messages}, headers=auth,
                           timeout=30)
    assert tokenized.status_code == 200, tokenized.text
    assert usage is not None and tokenized.json()["count"] == usage.prompt_tokens  # counted as a generation counts
    assert tokenized.json()["max_model_len"] == 512
    prompt = httpx.post(f"{edge_root}/tokenize", json={"model": MODEL, "prompt": "Hello"}, headers=auth, timeout=30)
    back = httpx.post(f"{edge_root}/detokenize", json={"model": MODEL, "tokens": prompt.json()["tokens"]},
                      headers=auth, timeout=30)
    assert back.json() == {"prompt": "Hello"}
    refused = httpx.post(f"{edge_root}/tokenize", json={"model": MODEL, "prompt": "Hello"}, timeout=30)
    assert refused.status_code == 401
    validate(refused.json(), "ErrorResponse")
    missing = httpx.post(f"{edge_root}/detokenize", json={"model": "nope", "tokens": [1]}, headers=auth, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("path", ["/v2/health/ready", "/v2/models/tiny-llama", "/v2"])
def test_v2_at_the_edge_is_inferplanes_not_tritons(stack: LocalStack, path: str) -> None:
    """Triton answers these without a key on its own port; at the edge they are the gateway's KServe v2 routes,
    which want the key."""
    edge_root = stack.base_url.removesuffix("/v1")
    assert httpx.get(f"http://127.0.0.1:{stack.ports['triton_http']}{path}", timeout=10).status_code == 200
    resp = httpx.get(edge_root + path, timeout=10)
    assert resp.status_code == 401 and isinstance(resp.json()["error"], str)


@pytest.mark.parametrize("path", ["/metrics", "/v2/repository/index", "/v2/models/tiny-llama/stats"])
def test_triton_http_and_other_internal_paths_are_404_at_the_edge(stack: LocalStack, path: str) -> None:
    edge_root = stack.base_url.removesuffix("/v1")
    resp = httpx.get(edge_root + path, timeout=10)
    assert resp.status_code == 404


@pytest.fixture(scope="module")
def quick_edge(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProcess]:
    """A second Envoy in front of the same gateway and router, with a 0.25 s request timeout (the long stream
    below takes 0.85 s at the fastest seen: it must outlive twice the edge's timeout)."""
    settings = EdgeSettings(port=free_port(), admin_port=free_port(), request_timeout_s=0.25,
                            stream_idle_timeout_s=30.0, gateway_addr=f"127.0.0.1:{stack.ports['gateway']}",
                            router_addr=f"127.0.0.1:{stack.ports['router']}",
                            access_log_path=str(stack.state / "logs" / "quick-edge-access.log"))
    with EnvoyProcess(settings, tmp_path_factory.mktemp("quick-edge")) as envoy:
        yield envoy


# Greedy decoding of this prompt runs to max_tokens (no end-of-text within 400 tokens): 0.85-2 s here.
LONG = {"prompt": "Return the", "max_tokens": 400}


def test_a_streamed_completion_outlives_the_edge_request_timeout(quick_edge: EnvoyProcess, api_key: str) -> None:
    client = openai.OpenAI(base_url=f"{quick_edge.base}/v1", api_key=api_key, max_retries=0, timeout=120)
    started = time.monotonic()
    chunks = list(client.completions.create(model=MODEL, prompt=LONG["prompt"], max_tokens=LONG["max_tokens"],
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    took = time.monotonic() - started
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["length"], ["stop"])
    assert took > 2 * quick_edge.settings.request_timeout_s, f"{usage.completion_tokens} tokens in {took:.2f}s"


def test_a_grpc_stream_outlives_the_edge_request_timeout(quick_edge: EnvoyProcess, api_key: str) -> None:
    started = time.monotonic()
    with grpc.insecure_channel(f"127.0.0.1:{quick_edge.settings.port}") as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        req = router_pb2.GenerateRequest(model=MODEL, prompt=LONG["prompt"], max_tokens=LONG["max_tokens"])
        req.sampling.temperature = 0
        msgs = list(stub.Generate(req, metadata=(("authorization", f"Bearer {api_key}"),), timeout=120))
    took = time.monotonic() - started
    assert msgs[-1].finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert took > 2 * quick_edge.settings.request_timeout_s, f"{msgs[-1].usage.completion_tokens} tokens in {took:.2f}s"


def test_an_oversize_body_is_413_from_the_edge(stack: LocalStack, api_key: str) -> None:
    rid = f"edge-413-{uuid.uuid4().hex[:8]}"
    limit = 1024 * 1024  # the edge's default, equal to the gateway's: the edge answers first
    body = json.dumps({"model": MODEL, "prompt": "x" * (limit + 10), "max_tokens": 1})
    resp = httpx.post(f"{stack.base_url}/completions", content=body, timeout=30,
                      headers={"authorization": f"Bearer {api_key}", "content-type": "application/json",
                               "x-request-id": rid})
    assert resp.status_code == 413
    validate(resp.json(), "ErrorResponse")
    assert resp.json()["error"]["code"] == "request_too_large"
    line = wait_for_line(stack.state / "logs" / "edge-access.log", rid)
    assert line["details"] == "request_payload_too_large" and line["upstream_host"] is None
