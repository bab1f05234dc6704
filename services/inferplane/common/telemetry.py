"""OpenTelemetry set-up: one tracer provider per process, configured from ``TelemetrySettings``."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

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


def setup_tracing(service_name: str, settings: TelemetrySettings) -> TracerProvider:
    """Install the global tracer provider for this process and return it (call ``shutdown`` at exit)."""
    provider = tracer_provider(service_name, settings)
    trace.set_tracer_provider(provider)
    return provider


def tracer_provider(service_name: str, settings: TelemetrySettings) -> TracerProvider:
    """A tracer provider whose spans name ``service_name``, not installed globally (a second service in the
    process: the REST edge in the router's, ``inferplane.cli.edge``); call ``shutdown`` at exit."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name, "service.namespace": "inferplane"}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    exporter = _exporter(settings)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    return provider
