"""``inferplane trace REQUEST_ID``: one request's spans as an indented waterfall, from the local trace file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

KEY_ATTRIBUTES = ("gen_ai.request.model", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
                  "gen_ai.response.finish_reasons", "inferplane.executor", "http.response.status_code",
                  "inferplane.key_id", "inferplane.cost")


def load_spans(path: Path) -> list[dict[str, Any]]:
    spans = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    spans.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a process that died mid-write
    return spans


def find_trace(spans: list[dict[str, Any]], request_id: str) -> str | None:
    for span in spans:
        if span.get("attributes", {}).get("inferplane.request_id") == request_id:
            return str(span["trace_id"])
    return None


def waterfall(spans: list[dict[str, Any]], width: int = 40) -> list[str]:
    """Lines of an indented tree: service, span, start offset, duration, bar, key attributes."""
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in spans:
        parent = s.get("parent_span_id") if s.get("parent_span_id") in ids else None
        children.setdefault(parent, []).append(s)
    for group in children.values():
        group.sort(key=lambda s: s["start_ns"])
    t0 = min(s["start_ns"] for s in spans)
    total = max(max(s["end_ns"] for s in spans) - t0, 1)
    lines = [f"{'service':<10} {'span':<52} {'start ms':>9} {'dur ms':>9}  timeline"]

    def walk(span: dict[str, Any], depth: int) -> None:
        start, dur = span["start_ns"] - t0, span["end_ns"] - span["start_ns"]
        a = int(start / total * width)
        bar = " " * a + "█" * max(1, int(dur / total * width))
        attrs = span.get("attributes", {})
        notes = " ".join(f"{k.split('.')[-1]}={attrs[k]}" for k in KEY_ATTRIBUTES if k in attrs)
        if span.get("status") == "ERROR":
            notes = ("ERROR " + notes).strip()
        name = ("  " * depth + span["name"])[:52]
        lines.append(f"{span.get('service') or '?':<10} {name:<52} {start / 1e6:>9.2f} {dur / 1e6:>9.2f}  "
                     f"{bar:<{width}} {notes}".rstrip())
        for child in children.get(span["span_id"], []):
            walk(child, depth + 1)

    for root in children.get(None, []):
        walk(root, 0)
    return lines


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("trace", help="print one request's trace as a waterfall (local trace file)")
    p.add_argument("request_id")
    p.add_argument("--file", type=Path, default=Path(".inferplane/traces.jsonl"))
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if not args.file.exists():
        print(f"no trace file at {args.file} (is the stack running with the file exporter?)")
        return 1
    spans = load_spans(args.file)
    trace_id = find_trace(spans, args.request_id)
    if trace_id is None:
        print(f"no span carries request id {args.request_id!r} in {args.file}: by default a stack keeps the "
              "traces of failed and slow requests and 1 % of the rest (`inferplane up --trace-sample 1` keeps all)")
        return 1
    mine = [s for s in spans if s["trace_id"] == trace_id]
    print(f"trace {trace_id}  request {args.request_id}  {len(mine)} spans")
    print("\n".join(waterfall(mine)))
    return 0
