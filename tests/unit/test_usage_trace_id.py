"""Each usage record carries its request's W3C trace id, from the router's span through metering's ledger."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from inferplane.common.errors import InvalidArgument
from inferplane.metering.convert import usage_from_pb, usage_to_pb
from inferplane.metering.store import MeteringStore, UsageRow
from inferplane.router.usage import current_trace_id

SECRET = b"trace-id-test-secret-0123456789abcdef"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _row(request_id: str, key_id: str, trace_id: str) -> UsageRow:
    return UsageRow(request_id=request_id, key_id=key_id, model="tiny-llama", prompt_tokens=1, completion_tokens=2,
                    finish_reason="stop", latency_ms=3, created_at=datetime.now(UTC), trace_id=trace_id)


def test_the_ledger_keeps_the_trace_id(tmp_path: Path) -> None:
    store = MeteringStore(f"sqlite:///{tmp_path / 'metering.db'}", SECRET)
    store.migrate()
    info, _ = store.create_key("k")
    assert store.record_usage(usage_from_pb(usage_to_pb(_row("with-trace", info.key_id, TRACE))))
    assert store.record_usage(_row("without", info.key_id, ""))
    rows = {r.request_id: r for r in store.list_usage(info.key_id)}
    assert rows["with-trace"].trace_id == TRACE and rows["without"].trace_id == ""
    assert usage_to_pb(rows["with-trace"]).trace_id == TRACE
    store.close()


@pytest.mark.parametrize("bad", ["4BF92F3577B34DA6A3CE929D0E0E4736", "4bf92f35", "x" * 32])
def test_a_malformed_trace_id_is_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="trace_id"):
        _row("r", "k", bad)


def test_the_routers_current_trace_id() -> None:
    assert current_trace_id() == ""  # no span
    provider = TracerProvider(sampler=ALWAYS_OFF)  # not exported: the id exists all the same
    with provider.get_tracer("t").start_as_current_span("request") as span:
        assert current_trace_id() == f"{span.get_span_context().trace_id:032x}" != "0" * 32
