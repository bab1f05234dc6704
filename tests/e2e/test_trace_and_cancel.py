"""One request is one trace across the mesh; a client that leaves mid-stream cancels the work and is billed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import grpc
import httpx
import pytest

from inferplane.cli.launcher import LocalStack
from inferplane.v1 import metering_pb2, metering_pb2_grpc

pytestmark = pytest.mark.e2e
MODEL = "tiny-llama"


def wait_for(predicate, timeout: float = 15.0, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def fresh_key(stack: LocalStack) -> str:
    """A key the router has not cached yet, so its VerifyKey call to metering is part of the request."""
    from inferplane.metering.main import MeteringSettings, open_store

    store = open_store(MeteringSettings(**stack.settings["metering"]))
    try:
        return store.create_key(f"trace-{uuid.uuid4().hex[:6]}")[1]
    finally:
        store.close()


def test_one_request_is_one_trace_through_every_service(stack: LocalStack) -> None:
    # Metering joins the request's trace through VerifyKey; the usage record itself is written by the
    # router's outbox in batches, outside any one request's trace (docs/observability.md).
    api_key = fresh_key(stack)
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    resp = httpx.post(f"{stack.base_url}/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {api_key}", "traceparent": traceparent},
                      json={"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
    assert resp.status_code == 200
    path = stack.state / "traces.jsonl"
    wanted = {"gateway", "router", "tokenizer", "executor", "metering", "triton"}

    def spans() -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if trace_id in line] if path.exists() else []

    def roots(found: list[dict]) -> list[dict]:
        ids = {s["span_id"] for s in found}
        return [s for s in found if s["parent_span_id"] not in ids]

    def complete() -> list[dict]:
        found = spans()
        return found if wanted <= {s["service"] for s in found} and len(roots(found)) == 1 else []

    found = wait_for(complete, timeout=30.0) or spans()
    assert wanted <= {s["service"] for s in found}, f"spans of trace {trace_id} from {wanted} not all exported"
    orphans = [(s["service"], s["name"]) for s in roots(found)]
    # Everything hangs under the edge span, whose parent is the caller's traceparent.
    assert orphans == [("gateway", "POST /v1/chat/completions")], orphans
    router = next(s for s in found if s["service"] == "router" and s["kind"] == "SERVER")
    assert router["attributes"]["gen_ai.request.model"] == MODEL
    assert router["attributes"]["gen_ai.usage.output_tokens"] == resp.json()["usage"]["completion_tokens"]
    triton = next(s for s in found if s["service"] == "triton" and s["name"] == "InferRequest")
    parent = next(s for s in found if s["span_id"] == triton["parent_span_id"])
    assert (parent["service"], parent["kind"]) == ("executor", "SERVER")
    assert router["attributes"]["inferplane.request_id"] == resp.headers["x-request-id"]
    assert api_key not in path.read_text()

    # `inferplane trace REQUEST_ID` prints the same tree as a waterfall
    out = subprocess.run([sys.executable, "-m", "inferplane.cli", "trace", resp.headers["x-request-id"], "--file",
                          str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert trace_id in out.stdout
    for service in wanted:
        assert service in out.stdout


def test_client_disconnect_cancels_and_bills_generated_tokens(stack: LocalStack, api_key: str) -> None:
    rid = f"e2e-cancel-{uuid.uuid4().hex[:8]}"
    body = {"model": MODEL, "prompt": "Return the", "max_tokens": 400, "temperature": 0.8, "seed": 3,
            "stream": True}
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", f"{stack.base_url}/completions", json=body,
            headers={"Authorization": f"Bearer {api_key}", "x-request-id": rid}) as resp:
        assert resp.status_code == 200
        seen = 0
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                seen += 1
            if seen >= 3:
                break  # leave mid-stream: the connection closes with the context manager

    def record() -> metering_pb2.UsageRecord | None:
        with grpc.insecure_channel(f"127.0.0.1:{stack.ports['metering']}") as channel:
            stub = metering_pb2_grpc.MeteringServiceStub(channel)
            admin = (("authorization", f"Bearer {stack.create_admin_key()}"),)
            recs = [r for r in stub.ListUsage(metering_pb2.ListUsageRequest(limit=1000), metadata=admin,
                                              timeout=10).records if r.request_id == rid]
        return recs[0] if recs else None

    rec = wait_for(record)
    assert rec is not None, "a cancelled request must still leave its usage record"
    assert rec.finish_reason == "cancelled"
    assert 3 <= rec.completion_tokens < 400


def test_logs_and_traces_hold_no_key_prompt_or_completion(stack: LocalStack, api_key: str) -> None:
    prompt = f"Secret prompt {uuid.uuid4().hex}"
    resp = httpx.post(f"{stack.base_url}/completions", headers={"Authorization": f"Bearer {api_key}"}, timeout=60,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert resp.status_code == 200
    completion = resp.json()["choices"][0]["text"].strip()
    bad = httpx.post(f"{stack.base_url}/completions", headers={"Authorization": f"Bearer {api_key}x"}, timeout=60,
                     json={"model": MODEL, "prompt": prompt})
    assert bad.status_code == 401 and api_key not in bad.text
    time.sleep(1.0)  # let the batch span processors flush
    texts = {p.name: p.read_text(errors="replace") for p in (stack.state / "logs").glob("*.log")}
    texts["traces.jsonl"] = (stack.state / "traces.jsonl").read_text()
    secret_part = api_key[len("sk-ip-") + 13:]  # the random part after "sk-ip-<key id>-"
    for name, text in texts.items():
        assert secret_part not in text, f"the API key appears in {name}"
        assert prompt not in text, f"the prompt appears in {name}"
        if len(completion) > 12:
            assert completion not in text, f"the completion appears in {name}"
