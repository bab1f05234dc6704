"""Which trace each traced Triton request belongs to, by Triton request id, for re-homing Triton's spans.

Triton joins a request's trace from the ``traceparent`` gRPC header, but reads the header's value as a C string
(its gRPC carrier hands OpenTelemetry ``string_ref::data()``, which is not NUL-terminated): when the bytes after
the value in Triton's memory are not zero (a Triton that has served a few hundred requests), the header parses as
invalid and Triton starts a trace of its own. Measured on the e2e stack: after 1,200 requests, 19-25 of 30 traced
requests had their Triton spans in a root trace of Triton's. Triton's model span names the request id
(``triton.request_id``), so the executor notes the trace context it sent with each traced request here, and the
OTLP receiver (``otlp_receiver.py``) puts such a trace's spans back under the executor's span.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from opentelemetry import trace

# Traced requests are few (head-sampled, 1 % by default) and a link is needed only until Triton has exported the
# request's spans (a fraction of a second after it ends): the most recent ones are plenty, and a link older than
# LINK_TTL_S is not used (a request id a client sends again, later and unsampled, must not join the old trace).
MAX_LINKS = 16384
LINK_TTL_S = 600.0

_lock = threading.Lock()
_links: OrderedDict[str, tuple[str, str, float]] = OrderedDict()


def remember(request_id: str) -> None:
    """Note the current span's context for Triton request ``request_id`` (only a sampled one, and only with an id:
    an unsampled request sends Triton no ``traceparent``)."""
    ctx = trace.get_current_span().get_span_context()
    if not request_id or not ctx.is_valid or not ctx.trace_flags.sampled:
        return
    with _lock:
        _links[request_id] = (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", time.monotonic())
        _links.move_to_end(request_id)
        while len(_links) > MAX_LINKS:
            _links.popitem(last=False)


def lookup(request_id: str) -> tuple[str, str] | None:
    """(trace id, parent span id) the executor sent with ``request_id``, as lowercase hex, if it was noted."""
    with _lock:
        link = _links.get(request_id)
    if link is None or time.monotonic() - link[2] > LINK_TTL_S:
        return None
    return link[0], link[1]


def forget_all() -> None:
    with _lock:
        _links.clear()
