"""The executor's OTLP receiver puts Triton traces that missed the caller's ``traceparent`` back into it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from inferplane.executor import trace_links
from inferplane.executor.otlp_receiver import OtlpFileReceiver, Rehomer, otlp_json_to_spans


def triton_span(trace_id: str, span_id: str, parent: str | None, name: str, request_id: str | None = None) -> dict:
    attrs = [{"key": "triton.model_name", "value": {"stringValue": "tiny-llama"}}]
    if request_id is not None:
        attrs.append({"key": "triton.request_id", "value": {"stringValue": request_id}})
    return {"traceId": trace_id, "spanId": span_id, "parentSpanId": parent or "", "name": name, "kind": 2,
            "startTimeUnixNano": "1", "endTimeUnixNano": "2", "attributes": attrs}


def export(url: str, spans: list[dict]) -> None:
    payload = {"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "triton"}}]}, "scopeSpans": [{"spans": spans}]}]}
    assert httpx.post(url, json=payload).status_code == 200


def sampled_request(request_id: str) -> tuple[str, str]:
    """Note ``request_id`` inside a sampled span, as the executor does when it sends the request to Triton."""
    tracer = TracerProvider().get_tracer(__name__)
    with tracer.start_as_current_span("inferplane.executor.sequence") as span:
        trace_links.remember(request_id)
        ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def test_an_orphaned_triton_trace_is_moved_under_the_executor_span_across_exports(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    receiver = OtlpFileReceiver(path)
    receiver.start()
    try:
        rid = f"req-{uuid.uuid4().hex[:8]}"
        trace_id, parent = sampled_request(rid)
        orphan = uuid.uuid4().hex  # the trace Triton started when it misread the traceparent
        # the model span and compute end first, the InferRequest root (no parent) in a later export
        export(receiver.url, [triton_span(orphan, "a" * 16, "b" * 16, "tiny-llama", rid),
                              triton_span(orphan, "c" * 16, "a" * 16, "compute")])
        export(receiver.url, [triton_span(orphan, "b" * 16, None, "InferRequest")])
        # a Triton trace that joined its caller's trace as it should, and one of a request nobody noted
        joined_rid = f"req-{uuid.uuid4().hex[:8]}"
        joined_trace, joined_parent = sampled_request(joined_rid)
        stranger = uuid.uuid4().hex
        export(receiver.url, [triton_span(joined_trace, "d" * 16, joined_parent, "InferRequest"),
                              triton_span(joined_trace, "e" * 16, "d" * 16, "tiny-llama", joined_rid),
                              triton_span(stranger, "f" * 16, None, "InferRequest"),
                              triton_span(stranger, "1" * 16, "f" * 16, "tiny-llama", "nobody-noted-this")])
    finally:
        receiver.stop()
    spans = {s["span_id"]: s for s in map(json.loads, path.read_text().splitlines())}
    assert {spans[x * 16]["trace_id"] for x in "abc"} == {trace_id}
    assert spans["b" * 16]["parent_span_id"] == parent  # the root hangs under the executor's span
    assert (spans["a" * 16]["parent_span_id"], spans["c" * 16]["parent_span_id"]) == ("b" * 16, "a" * 16)
    assert (spans["d" * 16]["trace_id"], spans["d" * 16]["parent_span_id"]) == (joined_trace, joined_parent)
    assert {spans[x * 16]["trace_id"] for x in "f1"} == {stranger}
    assert spans["f" * 16]["parent_span_id"] is None


def test_an_unsampled_request_leaves_no_link() -> None:
    rid = f"req-{uuid.uuid4().hex[:8]}"
    trace_links.remember(rid)  # no span at all
    tracer = TracerProvider(sampler=ALWAYS_OFF).get_tracer(__name__)
    with tracer.start_as_current_span("x"):
        trace_links.remember(rid)
    assert trace_links.lookup(rid) is None


def test_only_the_kept_spans_are_read_and_a_moved_trace_is_kept_whole() -> None:
    """With ``keep`` (the mesh's sampling), a span of a trace it drops is never converted (here its attributes would
    not even parse), and an orphaned trace moved into a kept trace is kept whole, the spans before its model span
    in the export included."""
    rid = f"req-{uuid.uuid4().hex[:8]}"
    trace_id, parent = sampled_request(rid)
    orphan, unsampled = uuid.uuid4().hex, uuid.uuid4().hex
    unreadable = triton_span(unsampled, "9" * 16, None, "InferRequest")
    unreadable["attributes"].append({"key": "broken", "value": {"intValue": "not a number"}})
    payload = {"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"spans": [
        triton_span(orphan, "b" * 16, None, "InferRequest"),  # before the model span that names the request
        triton_span(orphan, "a" * 16, "b" * 16, "tiny-llama", rid),
        unreadable,
        triton_span(unsampled, "8" * 16, "9" * 16, "tiny-llama", "never-sampled")]}]}]}
    spans = otlp_json_to_spans(payload, keep=lambda tid: tid == trace_id, rehome=Rehomer())
    assert [(s["span_id"], s["trace_id"], s["parent_span_id"]) for s in spans] == [
        ("b" * 16, trace_id, parent), ("a" * 16, trace_id, "b" * 16)]
    assert spans[1]["attributes"]["triton.request_id"] == rid and spans[0]["service"] == "triton"
