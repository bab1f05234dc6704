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

    def __call__(self, spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self._lock:
            for span in spans:
                request_id = span["attributes"].get("triton.request_id")
                target = self._link(str(request_id)) if request_id else None
                if target is not None and target[0] != span["trace_id"]:
                    self._moved[span["trace_id"]] = target
                    while len(self._moved) > self._max:
                        self._moved.popitem(last=False)
            for span in spans:
                target = self._moved.get(span["trace_id"])
                if target is not None:
                    span["trace_id"] = target[0]
                    if span["parent_span_id"] is None:
                        span["parent_span_id"] = target[1]
        return spans


def otlp_json_to_spans(payload: dict[str, Any], keep: Callable[[str], bool] | None = None,
                       rehome: Rehomer | None = None) -> list[dict[str, Any]]:
    """OTLP/JSON ``ExportTraceServiceRequest`` → the span dicts of ``inferplane.common.telemetry``, Triton's
    orphaned traces moved home by ``rehome`` when given; only the spans whose trace id ``keep`` accepts, when
    given."""
    out = []
    for rs in payload.get("resourceSpans", []):
        service = _attrs(rs.get("resource", {}).get("attributes")).get("service.name", "triton")
        for ss in rs.get("scopeSpans", []):
            for sp in ss.get("spans", []):
                code = sp.get("status", {}).get("code", 0)
                out.append({
                    "trace_id": sp["traceId"].lower(), "span_id": sp["spanId"].lower(),
                    "parent_span_id": (sp.get("parentSpanId") or "").lower() or None,
                    "name": sp.get("name", ""), "kind": KINDS.get(int(sp.get("kind", 0)), "UNSPECIFIED"),
                    "service": service, "start_ns": int(sp["startTimeUnixNano"]),
                    "end_ns": int(sp["endTimeUnixNano"]),
                    "status": {0: "UNSET", 1: "OK", 2: "ERROR"}.get(int(code) if str(code).isdigit() else 0, "UNSET"),
                    "attributes": _attrs(sp.get("attributes")),
                    "events": [{"name": e.get("name", ""), "time_ns": int(e.get("timeUnixNano", 0)),
                                "attributes": _attrs(e.get("attributes"))} for e in sp.get("events", [])],
                })
    if rehome is not None:
        out = rehome(out)
    return out if keep is None else [s for s in out if keep(s["trace_id"])]


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
