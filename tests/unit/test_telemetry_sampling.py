"""The default trace sampling: a share of traces whole, plus every failed or slow one (``HeadOrRecord`` +
``TailKeeper``), with the real OpenTelemetry SDK and an in-memory exporter."""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from inferplane.common.settings import TelemetrySettings
from inferplane.common.telemetry import HeadOrRecord, KeptSpanProcessor, TailKeeper, head_sampled, setup_tracing


class _Exported(InMemorySpanExporter):
    """The exporter behind the real ``KeptSpanProcessor``; reading it flushes the batch first."""

    processor: KeptSpanProcessor

    def get_finished_spans(self) -> tuple:  # type: ignore[override]
        self.processor.force_flush()
        return super().get_finished_spans()


def _provider(ratio: float, slow_s: float = 0.05) -> tuple[trace.Tracer, _Exported]:
    exporter = _Exported()
    exporter.processor = KeptSpanProcessor(exporter)
    provider = TracerProvider(sampler=HeadOrRecord(ratio))
    provider.add_span_processor(TailKeeper(exporter.processor, slow_s=slow_s))
    return provider.get_tracer("test"), exporter


def _request(tracer: trace.Tracer, *, fail: bool = False, status: int = 200, sleep_s: float = 0.0) -> int:
    with tracer.start_as_current_span("POST /v1/chat/completions", kind=SpanKind.SERVER) as root:
        with tracer.start_as_current_span("Generate", kind=SpanKind.CLIENT) as child:
            if fail:
                child.set_status(Status(StatusCode.ERROR, "boom"))
        time.sleep(sleep_s)
        root.set_attribute("http.response.status_code", status)
        return root.get_span_context().trace_id


def test_a_fast_successful_request_is_recorded_but_not_exported_at_ratio_zero() -> None:
    tracer, exporter = _provider(0.0)
    _request(tracer)
    assert exporter.get_finished_spans() == ()


def test_every_span_of_a_failed_or_refused_or_slow_request_is_exported() -> None:
    tracer, exporter = _provider(0.0)
    kept = {_request(tracer, fail=True), _request(tracer, status=404), _request(tracer, sleep_s=0.06)}
    _request(tracer)  # fast and fine: dropped
    spans = exporter.get_finished_spans()
    assert {s.context.trace_id for s in spans} == kept
    assert len(spans) == 6  # root and child of each kept trace


def test_ratio_one_exports_everything_and_the_choice_is_the_trace_ids() -> None:
    tracer, exporter = _provider(1.0)
    ids = {_request(tracer) for _ in range(5)}
    assert {s.context.trace_id for s in exporter.get_finished_spans()} == ids
    # the same rule in every process (and for Triton's spans, which arrive with the trace id only)
    tracer, exporter = _provider(0.5)
    for _ in range(200):
        tid = _request(tracer)
        exported = any(s.context.trace_id == tid for s in exporter.get_finished_spans())
        assert exported == head_sampled(format(tid, "032x"), 0.5)


def test_a_sampled_parent_is_followed_and_an_unsampled_one_is_only_recorded() -> None:
    tracer, exporter = _provider(0.0)
    for sampled in (True, False):
        parent = trace.SpanContext(trace_id=0xFFFF_FFFF_FFFF_FFFF_FFFF_FFFF_FFFF_FFFF, span_id=7, is_remote=True,
                                   trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled else 0))
        ctx = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        with tracer.start_as_current_span("Generate", context=ctx, kind=SpanKind.SERVER) as span:
            assert span.is_recording()
            assert span.get_span_context().trace_flags.sampled is sampled
    assert len(exporter.get_finished_spans()) == 1


def test_the_pending_traces_are_bounded() -> None:
    keeper = TailKeeper(SimpleSpanProcessor(InMemorySpanExporter()), slow_s=10, max_traces=8)
    tracer = TracerProvider(sampler=HeadOrRecord(0.0))
    tracer.add_span_processor(keeper)
    t = tracer.get_tracer("test")
    for _ in range(50):  # children whose local root never ends here
        root = t.start_span("root")
        with t.start_as_current_span("child", context=trace.set_span_in_context(root)):
            pass
    assert len(keeper._pending) == 8


def test_the_services_default_writes_only_failed_requests_to_the_trace_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "traces.jsonl"
    provider = setup_tracing("test", TelemetrySettings(exporter="file", file_path=path, sample_ratio=0.0),
                             install=False)
    tracer = provider.get_tracer("test")
    failed = _request(tracer, status=503)
    for _ in range(20):
        _request(tracer)
    provider.force_flush()
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(format(failed, "032x") in line for line in lines)
    provider.shutdown()
    off = setup_tracing("test", TelemetrySettings(exporter="none"), install=False)
    with off.get_tracer("test").start_as_current_span("x") as span:
        assert not span.is_recording()  # no exporter: nothing is even recorded


def test_two_providers_in_one_process_each_judge_their_own_local_root() -> None:
    """The REST edge in the router's process: the router's span is a child of the edge's (another provider)."""
    edge, edge_out = _provider(0.0)
    router, router_out = _provider(0.0)
    for status in (200, 503):
        with edge.start_as_current_span("POST /v1/completions", kind=SpanKind.SERVER) as http:
            with router.start_as_current_span("Generate", kind=SpanKind.SERVER) as rpc:
                rpc.set_attribute("rpc.grpc.status_code", 0 if status == 200 else 14)
            http.set_attribute("http.response.status_code", status)
    assert len(edge_out.get_finished_spans()) == 1 and len(router_out.get_finished_spans()) == 1
