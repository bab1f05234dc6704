"""The Grafana dashboard of the compose observability profile queries only metrics the services really export, and
is provisioned with the Prometheus datasource it names."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "compose" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "inferplane.json"
# Every package whose modules register metrics; the model code that runs inside Triton is left out (it needs
# Triton's Python backend and registers nothing in the process's Prometheus registry).
PACKAGES = ("inferplane.common", "inferplane.router", "inferplane.tokenizer", "inferplane.executor",
            "inferplane.metering", "inferplane.gateway", "inferplane.cli")
SKIP = ("inferplane.executor.triton_models", "inferplane.metering.migrations")  # alembic runs those
# PromQL's words that are not metric names: functions, aggregations, keywords and Grafana's variables.
PROMQL_WORDS = {"histogram_quantile", "sum", "rate", "by", "without", "avg", "max", "min", "count", "irate",
                "increase", "label_values", "le", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "bool", "offset", "topk", "bottomk"}
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# The LLM model's gauges, which Triton exports on its own metrics port (Triton custom metrics, not this registry).
LLM_MODEL = ROOT / "services" / "inferplane" / "executor" / "triton_models" / "llm" / "model.py"


def exported_names() -> set[str]:
    """The sample names of every collector the services' modules register (a Counter ``x``: ``x_total``; a
    Histogram: ``x_bucket``, ``x_count``, ``x_sum``; ...), as Prometheus scrapes them."""
    for package in PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}."):
            if not info.name.startswith(SKIP) and not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    names = set(REGISTRY._names_to_collectors)  # the registry's own index of every name it serves
    # _Gauges.NAMES: {"active": ("inferplane_llm_active_sequences", "..."), ...}, gauges keep their name in Triton
    gauges = re.search(r"class _Gauges:.*?NAMES[^=]*=\s*\{(.*?)\n\s*\}", LLM_MODEL.read_text(), re.S)
    assert gauges, f"no _Gauges.NAMES in {LLM_MODEL}"
    return names | set(re.findall(r'\(\s*"(inferplane_llm_\w+)"', gauges.group(1)))


def queried(expr: str) -> set[str]:
    """The metric names in one PromQL expression: identifiers that are not PromQL's words, label names inside
    ``{...}`` or ``by (...)``, strings, or durations and Grafana's ``$variables``."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # strings (label values, legends)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors ([$__rate_interval], [1m])
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\$\w+", "", expr)
    expr = re.sub(r"label_values\(([^,()]+),[^)]*\)", r"\1", expr)  # Grafana's label_values(metric, label)
    return {n for n in NAME.findall(expr) if n not in PROMQL_WORDS and not re.fullmatch(r"[\d.]+", n)}


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_queried_metric_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names()
    assert "gen_ai_server_time_to_first_token_seconds_bucket" in exported  # the walk found the router's metrics
    assert "inferplane_llm_kv_slots_in_use" in exported  # and the LLM model's gauges
    names = {name for expr in _exprs(dashboard) for name in queried(expr)}
    assert names, "no metric found in the dashboard's queries"
    assert names <= exported, f"queried but exported by no service: {sorted(names - exported)}"


def test_the_parser_finds_names_and_only_names() -> None:
    expr = ('histogram_quantile(0.9, sum by (le) (rate(gen_ai_server_time_to_first_token_seconds_bucket'
            '{gen_ai_request_model=~"$model"}[$__rate_interval])))')
    assert queried(expr) == {"gen_ai_server_time_to_first_token_seconds_bucket"}
    assert queried("sum(inferplane_router_usage_outbox_depth) + no_such_metric") == {
        "inferplane_router_usage_outbox_depth", "no_such_metric"}
    assert queried("label_values(inferplane_router_requests_total, gen_ai_request_model)") == {
        "inferplane_router_requests_total"}


def test_the_dashboard_covers_the_asked_for_signals() -> None:
    text = " ".join(_exprs(json.loads(DASHBOARD.read_text())))
    for metric in ("gen_ai_server_time_to_first_token_seconds", "gen_ai_server_time_per_output_token_seconds",
                   "inferplane_router_tokens_total", "inferplane_router_model_queued", "inferplane_router_model_shed",
                   "inferplane_router_model_running", "inferplane_executor_active_requests",
                   "inferplane_llm_kv_slots_in_use", "inferplane_llm_kv_slots_total",
                   "inferplane_router_usage_outbox_depth"):
        assert metric in text, metric


def test_panels_use_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "inferplane.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load((ROOT / "compose" / "docker-compose.yaml").read_text())
    grafana = compose["services"]["grafana"]
    assert grafana["profiles"] == ["observability"]
    assert f"./grafana/dashboards:{path}:ro" in grafana["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
