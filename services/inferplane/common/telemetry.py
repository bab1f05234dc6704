"""OpenTelemetry set-up: one tracer provider per process, configured from ``TelemetrySettings``."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind, StatusCode, TraceState
from opentelemetry.util.types import Attributes

from inferplane.common.settings import TelemetrySettings

log = logging.getLogger(__name__)


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """A span as one JSON-serialisable dict (ids as hex, times in Unix nanoseconds)."""
    ctx = span.get_span_context()
    assert ctx is not None, "a finished span always has a context"
    return {
        "trace_id": _hex(ctx.trace_id, 32),
        "span_id": _hex(ctx.span_id, 16),
        "parent_span_id": _hex(span.parent.span_id, 16) if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name"),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in (span.attributes or {}).items()},
        "events": [{"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})}
                   for e in span.events],
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per span to a file; several processes may share the file."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_to_dict(s), default=str) + "\n" for s in spans)
        with self._lock, self._path.open("a", encoding="utf-8") as f:
            f.write(lines)  # one write per batch: O_APPEND keeps lines of different processes whole
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _exporter(settings: TelemetrySettings) -> SpanExporter | None:
    if settings.exporter == "none":
        return None
    if settings.exporter == "console":
        return ConsoleSpanExporter()
    if settings.exporter == "file":
        return JsonLinesSpanExporter(settings.file_path)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # optional extra

    return OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=True)


class HeadOrRecord(Sampler):
    """Head sampling that still records what it does not sample.

    A trace is *sampled* (exported as it ends, and flagged so to the next process) when its parent was, or
    when its trace id falls within ``ratio`` (the same deterministic rule as ``TraceIdRatioBased``, so every
    process decides the same for one trace). Every other span is *recorded only*: ``TailKeeper`` holds it
    until its process's local root ends and exports it only when that trace turned out interesting.
    """

    def __init__(self, ratio: float) -> None:
        self._head = TraceIdRatioBased(ratio)
        self.ratio = ratio

    def head_sampled(self, trace_id: int) -> bool:
        return trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < self._head.bound

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Attributes = None,
                      links: Sequence[Link] | None = None, trace_state: TraceState | None = None) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if (parent.is_valid and parent.trace_flags.sampled) or self.head_sampled(trace_id):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes,
                                  parent.trace_state if parent.is_valid else trace_state)
        return SamplingResult(Decision.RECORD_ONLY, attributes, parent.trace_state if parent.is_valid else trace_state)

    def get_description(self) -> str:
        return f"HeadOrRecord{{{self.ratio}}}"


class KeptSpanProcessor(BatchSpanProcessor):
    """The batch processor behind ``TailKeeper``: it exports every span it is handed. ``TailKeeper`` already chose,
    so a recorded-only span goes out as a copy flagged sampled (the SDK's processors drop unsampled spans)."""

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.get_span_context()
        if ctx is not None and not ctx.trace_flags.sampled:
            span = ReadableSpan(
                name=span.name, context=trace.SpanContext(ctx.trace_id, ctx.span_id, is_remote=False,
                                                          trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
                                                          trace_state=ctx.trace_state),
                parent=span.parent, resource=span.resource, attributes=span.attributes, events=span.events,
                links=span.links, kind=span.kind, status=span.status, start_time=span.start_time,
                end_time=span.end_time, instrumentation_scope=span.instrumentation_scope)
        super().on_end(span)


def _failed(span: ReadableSpan) -> bool:
    """An ERROR span, or an answer that was not a success: an HTTP status >= 400 (OpenTelemetry leaves 4xx of a
    server span unset, but a refused request is what an operator looks for) or a gRPC status other than OK."""
    if span.status.status_code is StatusCode.ERROR:
        return True
    attrs = span.attributes or {}
    http = attrs.get("http.response.status_code")
    grpc_code = attrs.get("rpc.grpc.status_code")
    return (isinstance(http, int) and http >= 400) or (isinstance(grpc_code, int) and grpc_code != 0)


class TailKeeper(SpanProcessor):
    """Tail sampling within one process: keep a recorded-only trace when it failed or was slow.

    Sampled spans go straight to ``downstream``. A recorded-only span waits in memory, with the rest of its
    trace's spans in this process, until the trace's *local root* ends (a span whose parent is not one of this
    provider's live spans: the server span of an RPC, the gateway's HTTP span). Then the whole group goes to
    ``downstream`` when any of its spans failed (``_failed``) or the local root took ``slow_s`` or more, and is
    dropped otherwise. Every
    process on a failed request's path sees the failure (it travels back as an error status) and every
    process on a slow one sees it take long, so they keep the same traces. At most ``max_traces`` groups wait
    (the oldest is dropped first): spans that end after their root (background work) do not pile up.
    """

    def __init__(self, downstream: SpanProcessor, *, slow_s: float, max_traces: int = 4096) -> None:
        self._downstream = downstream
        self._slow_ns = int(slow_s * 1e9)
        self._max = max_traces
        self._pending: OrderedDict[int, list[ReadableSpan]] = OrderedDict()
        self._live: set[int] = set()  # span ids of this provider's recorded-only spans that have not ended
        self._lock = threading.Lock()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        ctx = span.get_span_context()
        if ctx is not None and not ctx.trace_flags.sampled:
            with self._lock:
                self._live.add(ctx.span_id)

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.get_span_context()
        if ctx is None:
            return
        if ctx.trace_flags.sampled:
            self._downstream.on_end(span)
            return
        with self._lock:
            self._live.discard(ctx.span_id)
            # a local root: its parent is not a span of this provider (another process's, or another provider's
            # in this process: the REST edge's HTTP span above the router's in ``inferplane.cli.edge``)
            local_root = span.parent is None or span.parent.span_id not in self._live
            group = self._pending.pop(ctx.trace_id, None) or []
            group.append(span)
            if not local_root:
                self._pending[ctx.trace_id] = group
                while len(self._pending) > self._max:
                    self._pending.popitem(last=False)
                return
        took = (span.end_time or 0) - (span.start_time or 0)
        if took >= self._slow_ns or any(_failed(s) for s in group):
            for s in group:
                self._downstream.on_end(s)

    def shutdown(self) -> None:
        self._downstream.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._downstream.force_flush(timeout_millis)


def setup_tracing(service_name: str, settings: TelemetrySettings, *, install: bool = True) -> TracerProvider:
    """Install the global tracer provider for this process and return it (call ``shutdown`` at exit;
    ``install=False``: only return it).

    Without an exporter nothing is recorded (an always-off sampler: spans cost next to nothing). With one,
    ``settings.sample_ratio`` of the traces are exported whole, and the rest only when they failed or took
    ``settings.slow_request_s`` or more (``HeadOrRecord`` + ``TailKeeper``); export runs on a background thread
    in batches, off the request path.
    """
    resource = Resource.create({"service.name": service_name, "service.namespace": "inferplane"})
    exporter = _exporter(settings)
    if exporter is None:
        provider = TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    else:
        provider = TracerProvider(resource=resource, sampler=HeadOrRecord(settings.sample_ratio))
        if settings.sample_ratio >= 1:
            provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
        else:
            provider.add_span_processor(TailKeeper(KeptSpanProcessor(exporter, schedule_delay_millis=500),
                                                   slow_s=settings.slow_request_s))
    if install:
        trace.set_tracer_provider(provider)
    return provider


def tracer_provider(service_name: str, settings: TelemetrySettings) -> TracerProvider:
    """A tracer provider whose spans name ``service_name``, not installed globally (a second service in the
    process: the REST edge in the router's, ``inferplane.cli.edge``); call ``shutdown`` at exit."""
    return setup_tracing(service_name, settings, install=False)


def head_sampled(trace_id_hex: str, ratio: float) -> bool:
    """Whether ``HeadOrRecord(ratio)`` samples the trace ``trace_id_hex`` (for spans that arrive from elsewhere,
    e.g. Triton's, which samples on its own)."""
    try:
        return HeadOrRecord(ratio).head_sampled(int(trace_id_hex, 16))
    except ValueError:
        return False
