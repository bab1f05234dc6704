"""The numbers of the usage dashboard, from what metering and the router already keep.

Plain functions, no I/O: metering's usage rows (``GetUsageSummary``: per UTC day, key, model and service tier)
summed per day, model and key; its recent records (``ListUsage``); keys and their budgets; and the router's
Prometheus histograms read back into percentiles. Money stays integer nano-dollars until it leaves here as exact
USD strings (``format_usd``): the page never does arithmetic on money.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from inferplane.common import wire
from inferplane.common.money import format_usd
from inferplane.v1 import metering_pb2

TTFT_METRIC = "gen_ai_server_time_to_first_token_seconds"
ITL_METRIC = "gen_ai_server_time_per_output_token_seconds"
REQUESTS_METRIC = "inferplane_router_requests"
QUANTILES = (0.5, 0.9, 0.99)
USAGE_FIELDS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cancelled_requests",
                "cost_nanodollars")


def _sums(rows: Iterable[metering_pb2.UsageSummaryRow], by: str) -> list[dict[str, Any]]:
    totals: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(USAGE_FIELDS, 0))
    for row in rows:
        out = totals[getattr(row, by)]
        for name in USAGE_FIELDS:
            out[name] += getattr(row, name)
    return [_money({by: name, **values}) for name, values in sorted(totals.items())]


def _money(values: dict[str, Any]) -> dict[str, Any]:
    """``cost`` (the exact USD string: what the page shows) beside ``cost_nanodollars`` (an integer: only the
    height of a bar), ``total_tokens`` added."""
    out = dict(values)
    out["total_tokens"] = values["prompt_tokens"] + values["completion_tokens"]
    out["cost"] = format_usd(values["cost_nanodollars"])
    return out


def usage_section(rows: list[metering_pb2.UsageSummaryRow], key_names: dict[str, str]) -> dict[str, Any]:
    """Totals, and sums per day, model, key and (day, model) for the charts; every row as metering gave it."""
    total = _sums(rows, "tenant_id")  # one group per tenant, summed below
    whole = {name: sum(t[name] for t in total) for name in ("requests", "prompt_tokens", "cached_tokens",
                                                             "completion_tokens", "cancelled_requests",
                                                             "total_tokens")}
    by_key = _sums(rows, "key_id")
    for item in by_key:
        item["name"] = key_names.get(item["key_id"], "")
    day_model: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(USAGE_FIELDS, 0))
    for row in rows:
        cell = day_model[(row.day, row.model)]
        for name in USAGE_FIELDS:
            cell[name] += getattr(row, name)
    return {
        "totals": {**whole, "cost": format_usd(sum(r.cost_nanodollars for r in rows))},
        "by_day": _sums(rows, "day"),
        "by_model": _sums(rows, "model"),
        "by_key": by_key,
        "by_day_model": [_money({"day": d, "model": m, **v}) for (d, m), v in sorted(day_model.items())],
        "rows": [{"date": r.day, "key_id": r.key_id, "model": r.model, "service_tier": r.service_tier or None,
                  "requests": r.requests, "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens,
                  "completion_tokens": r.completion_tokens,
                  "cancelled_requests": r.cancelled_requests, "cost": format_usd(r.cost_nanodollars)} for r in rows],
    }


def recent_section(records: Iterable[metering_pb2.UsageRecord]) -> list[dict[str, Any]]:
    """The newest usage records, with their trace ids (``inferplane trace REQUEST_ID`` prints the trace; a
    collector's UI finds it by the trace id)."""
    return [{"request_id": r.request_id, "trace_id": r.trace_id or None,
             "created_at": r.created_at.ToDatetime().isoformat() + "Z", "key_id": r.key_id, "model": r.model,
             "service_tier": r.service_tier or None, "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens,
             "completion_tokens": r.completion_tokens, "finish_reason": r.finish_reason,
             "cancelled": r.cancelled, "latency_ms": r.latency_ms,
             "ttft_ms": r.time_to_first_token_ms if r.HasField("time_to_first_token_ms") else None,
             "cost": format_usd(r.cost_nanodollars) if r.HasField("cost_nanodollars") else None}
            for r in records]


def keys_section(keys: Iterable[metering_pb2.ApiKeyInfo], budgets: Iterable[metering_pb2.Budget]) -> list[dict]:
    """Every key with its own budget (scope ``key``) and what is left of it this period."""
    own = {b.subject_id: b for b in budgets if b.scope == metering_pb2.BUDGET_SCOPE_KEY}
    out = []
    for k in keys:
        item: dict[str, Any] = {"key_id": k.key_id, "name": k.name, "tenant": k.tenant_id, "scopes": list(k.scopes),
                                "revoked": k.HasField("revoked_at"), "budget": None}
        b = own.get(k.key_id)
        if b is not None:
            left = b.limit_nanodollars - b.spent_nanodollars - b.reserved_nanodollars
            item["budget"] = {"limit": format_usd(b.limit_nanodollars), "spent": format_usd(b.spent_nanodollars),
                              "reserved": format_usd(b.reserved_nanodollars), "left": format_usd(left),
                              "period": metering_pb2.BudgetPeriod.Name(b.period).removeprefix("BUDGET_PERIOD_")
                              .lower()}
        out.append(item)
    return out


# --- Prometheus ----------------------------------------------------------------------------------------

def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's ``histogram_quantile`` on cumulative ``(upper bound, count)`` buckets: linear inside the
    bucket the rank falls in; None without observations; the highest finite bound when the rank is in +Inf."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def latency_section(metrics_text: str) -> dict[str, Any]:
    """TTFT and inter-token latency percentiles (seconds, all models, since the router started), and the router's
    request counter by outcome (the page turns two readings into requests per second)."""
    buckets: dict[str, dict[float, float]] = {TTFT_METRIC: defaultdict(float), ITL_METRIC: defaultdict(float)}
    counts: dict[str, float] = {TTFT_METRIC: 0.0, ITL_METRIC: 0.0}
    outcomes: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name.removesuffix("_bucket") in buckets and sample.name.endswith("_bucket"):
                buckets[sample.name.removesuffix("_bucket")][float(sample.labels["le"])] += sample.value
            elif sample.name.removesuffix("_count") in counts and sample.name.endswith("_count"):
                counts[sample.name.removesuffix("_count")] += sample.value
            elif sample.name == REQUESTS_METRIC + "_total":
                outcomes[sample.labels.get("outcome", "")] += sample.value
    out: dict[str, Any] = {}
    for key, metric in (("ttft_s", TTFT_METRIC), ("itl_s", ITL_METRIC)):
        pairs = list(buckets[metric].items())
        out[key] = {f"p{round(q * 100)}": histogram_quantile(q, pairs) for q in QUANTILES}
        out[key]["count"] = int(counts[metric])
    total = int(sum(outcomes.values()))
    out["requests"] = {"total": total, "errors": int(outcomes.get(wire.ERROR, 0)),
                       "by_outcome": {k: int(v) for k, v in sorted(outcomes.items())}}
    return out
