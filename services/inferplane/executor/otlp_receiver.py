"""A loopback OTLP/HTTP JSON receiver for Triton's spans, for the local "file" trace exporter.

Triton exports its OpenTelemetry spans (``InferRequest`` → model → ``compute``) only over OTLP/HTTP.
With a collector (exporter "otlp") Triton sends there directly; with the local file exporter the
executor runs this receiver and appends Triton's spans to the same JSON-lines file as every service,
so ``inferplane trace`` shows them inside the request's trace. Triton traces every request on its own; the
receiver keeps the spans of the traces the mesh samples by trace id (``keep``), and drops the rest unread.
A Triton trace that should have joined a mesh trace but started one of its own (Triton misreads the
``traceparent`` header at times: ``trace_links.py``) is put back under the executor's span, found by the request
id on Triton's model span, before ``keep`` looks at it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from inferplane.executor import trace_links

log = logging.getLogger(__name__)
KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _value(v: dict[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in v:
            return v[key]
    if "intValue" in v:
        return int(v["intValue"])
    if "arrayValue" in v:
        return [_value(x) for x in v["arrayValue"].get("values", [])]
    return None


def _attrs(items: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {a["key"]: _value(a.get("value", {})) for a in items or []}


class Rehomer:
    """Moves Triton traces into the mesh traces they belong to (module docstring).

    A Triton trace whose model span names a request id that ``link`` knows, under another trace id than the
    linked one, is *moved*: each of its spans, in this export or a later one (Triton exports a request's spans as
    they end, so they can straddle exports), takes the linked trace id, and its root (no parent) the linked span
    as parent. A trace that joined the caller's trace as it should is left as it is."""

    def __init__(self, link: Callable[[str], tuple[str, str] | None] = trace_links.lookup,
                 max_moved: int = 4096) -> None:
        self._link = link
        self._max = max_moved
        self._moved: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, trace_id: str, request_id: str) -> None:
        """A span of ``trace_id`` names ``request_id``: the trace moves if that request's link says elsewhere."""
        target = self._link(request_id)
        if target is not None and target[0] != trace_id:
            with self._lock:
                self._moved[trace_id] = target
                while len(self._moved) > self._max:
                    self._moved.popitem(last=False)

    def target(self, trace_id: str) -> tuple[str, str] | None:
        """(trace id, parent span id for its root) where ``trace_id``'s spans go; None: they stay."""
        with self._lock:
            return self._moved.get(trace_id)


def _request_id(span: dict[str, Any]) -> str | None:
    """A raw OTLP span's ``triton.request_id`` (Triton's model span has one), without reading its other
    attributes."""
    for a in span.get("attributes") or ():
        if a.get("key") == "triton.request_id":
            value = _value(a.get("value", {}))
            return str(value) if value else None
    return None


def otlp_json_to_spans(payload: dict[str, Any], keep: Callable[[str], bool] | None = None,
                       rehome: Rehomer | None = None) -> list[dict[str, Any]]:
    """OTLP/JSON ``ExportTraceServiceRequest`` → the span dicts of ``inferplane.common.telemetry``, Triton's
    orphaned traces moved home by ``rehome`` when given; only the spans whose (moved) trace id ``keep`` accepts,
    when given.

    Triton traces every request and the mesh keeps few (1 % by default), so the spans are read in two passes: the
    first only finds the traces to move (the model spans' request ids), the second converts only the spans it
    keeps; a dropped span's attributes and events are never read (they were a tenth of the executor's CPU per
    request)."""
    raw = [(rs, sp) for rs in payload.get("resourceSpans", []) for ss in rs.get("scopeSpans", [])
           for sp in ss.get("spans", [])]
    if rehome is not None:
        for _, sp in raw:
            if (request_id := _request_id(sp)) is not None:
                rehome.note(sp["traceId"].lower(), request_id)
    services: dict[int, str] = {}
    out = []
    for rs, sp in raw:
        trace_id, parent = sp["traceId"].lower(), (sp.get("parentSpanId") or "").lower() or None
        target = rehome.target(trace_id) if rehome is not None else None
        if target is not None:
            trace_id, parent = target[0], parent or target[1]
        if keep is not None and not keep(trace_id):
            continue
        service = services.get(id(rs))
        if service is None:
            service = services[id(rs)] = _attrs(rs.get("resource", {}).get("attributes")).get("service.name",
                                                                                             "triton")
        code = sp.get("status", {}).get("code", 0)
        out.append({
            "trace_id": trace_id, "span_id": sp["spanId"].lower(), "parent_span_id": parent,
            "name": sp.get("name", ""), "kind": KINDS.get(int(sp.get("kind", 0)), "UNSPECIFIED"),
            "service": service, "start_ns": int(sp["startTimeUnixNano"]),
            "end_ns": int(sp["endTimeUnixNano"]),
            "status": {0: "UNSET", 1: "OK", 2: "ERROR"}.get(int(code) if str(code).isdigit() else 0, "UNSET"),
            "attributes": _attrs(sp.get("attributes")),
            "events": [{"name": e.get("name", ""), "time_ns": int(e.get("timeUnixNano", 0)),
                        "attributes": _attrs(e.get("attributes"))} for e in sp.get("events", [])],
        })
    return out


class OtlpFileReceiver:
    """``POST /v1/traces`` (application/json) on loopback → lines appended to ``path``."""

    def __init__(self, path: Path, host: str = "127.0.0.1", port: int = 0,
                 keep: Callable[[str], bool] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = threading.Lock()
        target = self.path
        rehome = Rehomer()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    spans = otlp_json_to_spans(json.loads(body or b"{}"), keep, rehome)
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("unreadable OTLP payload from Triton: %s", exc)
                    self.send_response(400)
                    self.end_headers()
                    return
                if spans:
                    with lock, target.open("a", encoding="utf-8") as f:
                        f.write("".join(json.dumps(s) + "\n" for s in spans))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self._server.server_address[1])
        self.url = f"http://{host}:{self.port}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, so only when it runs
            self._server.shutdown()
        self._server.server_close()
