"""The router's request metrics (GenAI semantic conventions, Prometheus spelling)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from inferplane.common.metrics import LATENCY_BUCKETS

TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
MODEL = ["gen_ai_request_model", "gen_ai_operation_name"]

REQUESTS = Counter("inferplane_router_requests", "Generation requests, by model and outcome",
                   [*MODEL, "outcome"])
TIME_TO_FIRST_TOKEN = Histogram("gen_ai_server_time_to_first_token_seconds",
                                "Time from acceptance to the first generated token", MODEL, buckets=LATENCY_BUCKETS)
TIME_PER_OUTPUT_TOKEN = Histogram("gen_ai_server_time_per_output_token_seconds",
                                  "Mean time between output tokens after the first (inter-token latency)", MODEL,
                                  buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1))
REQUEST_DURATION = Histogram("gen_ai_server_request_duration_seconds", "Time from acceptance to the last token",
                             MODEL, buckets=LATENCY_BUCKETS)
TOKEN_USAGE = Histogram("gen_ai_client_token_usage", "Tokens per request, by type (input/output)",
                        [*MODEL, "gen_ai_token_type"], buckets=TOKEN_BUCKETS)
TOKENS = Counter("inferplane_router_tokens", "Tokens consumed and produced, by type (input, output; cached_input: "
                 "input tokens reused from the model's prefix cache)", [*MODEL, "gen_ai_token_type"])
USAGE_RECORDS_FAILED = Counter("inferplane_router_usage_records_failed",
                               "Usage records metering did not accept after every retry")


def observe(model: str, operation: str, outcome: str, *, prompt_tokens: int, completion_tokens: int,
            ttft_s: float | None, duration_s: float, last_token_s: float | None, cached_tokens: int = 0) -> None:
    labels = (model, operation)
    REQUESTS.labels(*labels, outcome).inc()
    REQUEST_DURATION.labels(*labels).observe(duration_s)
    if ttft_s is not None:
        TIME_TO_FIRST_TOKEN.labels(*labels).observe(ttft_s)
        if completion_tokens > 1 and last_token_s is not None:
            TIME_PER_OUTPUT_TOKEN.labels(*labels).observe((last_token_s - ttft_s) / (completion_tokens - 1))
    for kind, n in (("input", prompt_tokens), ("output", completion_tokens)):
        TOKEN_USAGE.labels(*labels, kind).observe(n)
        TOKENS.labels(*labels, kind).inc(n)
    if cached_tokens:  # of the input tokens, those the model reused from its prefix cache
        TOKENS.labels(*labels, "cached_input").inc(cached_tokens)
