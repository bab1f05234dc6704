"""Every service's Prometheus endpoint, after real traffic, shows plausible figures."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inferplane.cli.launcher import LocalStack

pytestmark = pytest.mark.e2e
MODEL = "tiny-llama"


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(url, timeout=10).text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def total(metrics: dict, name: str, **labels: str) -> float:
    return sum(v for lab, v in metrics.get(name, []) if all(lab.get(k) == want for k, want in labels.items()))


def test_metrics_after_traffic(stack: LocalStack, api_key: str) -> None:
    before = scrape(stack.metrics_url("router"))
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60) as http:
        for i in range(3):
            r = http.post("/completions", json={"model": MODEL, "prompt": "Return the", "max_tokens": 6 + i,
                                                "temperature": 0})
            assert r.status_code == 200
            for k in usage:
                usage[k] += r.json()["usage"][k]
    after = scrape(stack.metrics_url("router"))
    m = {"gen_ai_request_model": MODEL}
    for kind, key in (("input", "prompt_tokens"), ("output", "completion_tokens")):
        grown = (total(after, "inferplane_router_tokens_total", gen_ai_token_type=kind, **m)
                 - total(before, "inferplane_router_tokens_total", gen_ai_token_type=kind, **m))
        assert grown == usage[key], kind
    n = total(after, "gen_ai_server_time_to_first_token_seconds_count", **m)
    assert n >= 3
    ttft = total(after, "gen_ai_server_time_to_first_token_seconds_sum", **m)
    e2e = total(after, "gen_ai_server_request_duration_seconds_sum", **m)
    assert 0 < ttft <= e2e
    assert total(after, "gen_ai_server_time_per_output_token_seconds_count", **m) >= 3
    assert total(after, "inferplane_router_requests_total", outcome="length", **m) >= 3

    executor = scrape(stack.metrics_url("executor"))
    assert "inferplane_executor_active_requests" in executor and "inferplane_executor_queue_depth" in executor
    # the router's generations travel as sequences on its channel to the executor: several per frame, frames
    # counted apart from the channel's one long-lived RPC
    assert total(executor, "inferplane_executor_generations_finished_total") >= 3
    assert total(executor, "inferplane_executor_channel_frames_total") >= 1
    assert total(executor, "inferplane_executor_channel_tokens_total") >= usage["completion_tokens"] - 3
    tokenizer = scrape(stack.metrics_url("tokenizer"))
    assert total(tokenizer, "inferplane_grpc_server_handled_total", grpc_method="Encode", grpc_code="OK") >= 3
    metering = scrape(stack.metrics_url("metering"))
    assert total(metering, "inferplane_metering_usage_records_total", result="created") >= 3
    assert total(metering, "inferplane_metering_ingest_lag_seconds_count") >= 3
    gateway = scrape(stack.metrics_url("gateway"))
    assert total(gateway, "inferplane_gateway_http_requests_total", http_route="/v1/completions",
                 http_response_status_code="200") >= 3
    # Triton's own endpoint stays available to scrape
    triton = httpx.get(stack.metrics_url("triton"), timeout=10).text
    assert "nv_inference_request_success" in triton
