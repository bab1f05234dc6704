"""The usage dashboard's numbers from metering's messages and the router's metrics, and its sign-in file."""

from __future__ import annotations

import stat
from decimal import Decimal
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server

from inferplane.cli.launcher import LocalStack, StackConfig
from inferplane.gateway.dashboard import Sessions, _login_key, _router_metrics
from inferplane.gateway.dashboard_data import histogram_quantile, keys_section, latency_section, usage_section
from inferplane.v1 import metering_pb2


def _row(day: str, key: str, model: str, requests: int, prompt: int, completion: int, cost: int,
         cancelled: int = 0, cached: int = 0, tier: str = "default") -> metering_pb2.UsageSummaryRow:
    return metering_pb2.UsageSummaryRow(day=day, key_id=key, tenant_id="t", model=model, requests=requests,
                                        prompt_tokens=prompt, completion_tokens=completion, cost_nanodollars=cost,
                                        cancelled_requests=cancelled, cached_tokens=cached, service_tier=tier)


def test_usage_sums_are_exact_and_grouped() -> None:
    rows = [_row("2026-12-04", "a", "m1", 2, 10, 20, 1, cached=8), _row("2026-12-05", "a", "m1", 1, 5, 5, 2),
            _row("2026-12-05", "b", "m2", 3, 7, 0, 100_000_000_000_000_001, cancelled=1, cached=3, tier="")]
    out = usage_section(rows, {"a": "alpha"})
    # 100000 dollars and 4 nano-dollars: a float would lose the nano-dollars
    assert out["totals"] == {"requests": 6, "prompt_tokens": 22, "cached_tokens": 11, "completion_tokens": 25,
                             "cancelled_requests": 1, "total_tokens": 47, "cost": "100000000.000000004"}
    assert [(r["service_tier"], r["cached_tokens"]) for r in out["rows"]] == [("default", 8), ("default", 0),
                                                                               (None, 3)]
    assert [(m["model"], m["cached_tokens"]) for m in out["by_model"]] == [("m1", 8), ("m2", 3)]
    assert Decimal(out["totals"]["cost"]) == sum(Decimal(r["cost"]) for r in out["rows"])
    assert [(k["key_id"], k["name"], k["requests"], k["cost"]) for k in out["by_key"]] == [
        ("a", "alpha", 3, "0.000000003"), ("b", "", 3, "100000000.000000001")]
    assert [(d["day"], d["total_tokens"]) for d in out["by_day"]] == [("2026-12-04", 30), ("2026-12-05", 17)]
    assert [(m["model"], m["prompt_tokens"]) for m in out["by_model"]] == [("m1", 15), ("m2", 7)]
    assert [(c["day"], c["model"], c["cost_nanodollars"]) for c in out["by_day_model"]] == [
        ("2026-12-04", "m1", 1), ("2026-12-05", "m1", 2), ("2026-12-05", "m2", 100_000_000_000_000_001)]


def test_keys_with_budgets_show_what_is_left() -> None:
    keys = [metering_pb2.ApiKeyInfo(key_id="a", name="alpha", scopes=["inference"]),
            metering_pb2.ApiKeyInfo(key_id="b", name="beta")]
    budgets = [metering_pb2.Budget(scope=metering_pb2.BUDGET_SCOPE_KEY, subject_id="a", limit_nanodollars=2_500_000_000,
                                   period=metering_pb2.BUDGET_PERIOD_MONTHLY, spent_nanodollars=1_000_000_001,
                                   reserved_nanodollars=500_000_000),
               metering_pb2.Budget(scope=metering_pb2.BUDGET_SCOPE_TENANT, subject_id="b", limit_nanodollars=1)]
    out = keys_section(keys, budgets)
    assert out[0]["budget"] == {"limit": "2.5", "spent": "1.000000001", "reserved": "0.5", "left": "0.999999999",
                                "period": "monthly"}
    assert out[1]["budget"] is None  # a tenant's budget is not the key's own


def test_histogram_quantile_matches_prometheus() -> None:
    # 10 observations: 5 at or below 0.1, 9 at or below 0.5, 1 above 1.0
    buckets = [(0.1, 5), (0.5, 9), (1.0, 9), (float("inf"), 10)]
    assert histogram_quantile(0.5, buckets) == 0.1
    assert abs(histogram_quantile(0.7, buckets) - 0.3) < 1e-12  # type: ignore[operator]
    assert histogram_quantile(0.99, buckets) == 1.0  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, [(0.1, 0), (float("inf"), 0)]) is None


def test_latency_from_the_routers_metrics_text() -> None:
    registry = CollectorRegistry()
    labels = ["gen_ai_request_model", "gen_ai_operation_name"]
    ttft = Histogram("gen_ai_server_time_to_first_token_seconds", "", labels, buckets=(0.01, 0.1, 1),
                     registry=registry)
    requests = Counter("inferplane_router_requests", "", [*labels, "outcome"], registry=registry)
    for model, seconds in (("m1", 0.005), ("m1", 0.05), ("m2", 0.5), ("m2", 0.05)):
        ttft.labels(model, "chat").observe(seconds)
    requests.labels("m1", "chat", "stop").inc(3)
    requests.labels("m2", "chat", "error").inc()
    out = latency_section(generate_latest(registry).decode())
    # both models' buckets summed: 1 at or below 0.01, 3 at or below 0.1; rank 2 lies halfway into (0.01, 0.1]
    assert out["ttft_s"]["count"] == 4 and abs(out["ttft_s"]["p50"] - 0.055) < 1e-12
    assert out["itl_s"] == {"p50": None, "p90": None, "p99": None, "count": 0}
    assert out["requests"] == {"total": 4, "errors": 1, "by_outcome": {"error": 1, "stop": 3}}


def test_the_sign_in_link_and_sessions(tmp_path: Path) -> None:
    """The launcher's link and admin key in its credentials file (the gateway's ``dashboard_credentials_file``)."""
    stack = LocalStack(StackConfig(state_dir=tmp_path, ports=dict.fromkeys(StackConfig().ports, 0) | {"edge": 8080}))
    link = stack.dashboard_link()
    token = link.partition("?token=")[2]
    assert link.startswith("http://127.0.0.1:8080/dashboard/login?token=") and len(token) >= 40
    assert stack.dashboard_link() != link  # a new token each time
    path = stack.write_env("sk-ip-demo", "sk-ip-admin", link)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _login_key(str(path), token) == "sk-ip-admin"
    for wrong in ("another", "", token[:-1], "sk-ip-admin", "sk-ip-demo"):
        assert _login_key(str(path), wrong) is None, wrong
    assert _login_key("", token) is None
    stack.write_env("sk-ip-demo", "sk-ip-admin")  # no link written: no link sign-in
    assert _login_key(str(path), token) is None
    stack.write_env("sk-ip-demo", None, link)  # a link but no admin key to act with
    assert _login_key(str(path), token) is None
    path.unlink()
    assert _login_key(str(path), token) is None
    sessions = Sessions()
    one = sessions.open("sk-ip-a")
    assert sessions.key(one) == "sk-ip-a" and sessions.key("forged") is None and sessions.key(None) is None
    sessions.close(one)
    assert sessions.key(one) is None


def test_a_separate_gateway_scrapes_the_routers_metrics() -> None:
    """``router_metrics_url`` (the gateway apart from the router): read over HTTP from a real metrics server."""
    registry = CollectorRegistry()
    Counter("inferplane_router_requests", "", ["outcome"], registry=registry).labels("stop").inc(2)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        text = _router_metrics(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        thread.join(5)
    assert latency_section(text)["requests"]["total"] == 2
