"""The autoscaler's decision on synthetic demand series (one sample a second, as the launcher's loop takes them):
the stable window, the panic window at 2x capacity, and the MIN/MAX bounds; and its measurement over real HTTP
metrics pages (one fetch of each page per tick)."""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from inferplane.cli.autoscale import (
    ROUTER_DEMAND_METRICS,
    TRITON_BUSY_GAUGES,
    TRITON_TRAFFIC_COUNTER,
    Autoscaler,
    AutoscaleSettings,
    Decision,
    ExecutorReplica,
    ExecutorScaler,
    ModelTraffic,
    sum_by_model,
)
from inferplane.cli.launcher import StackConfig, autoscale_settings, stack_settings


def run(scaler: Autoscaler, series: list[float], *, start: float = 0.0, current: int,
        follow: bool = False) -> list[Decision]:
    """Feed one sample a second and decide after each; ``follow``: the replicas become what was decided."""
    out = []
    for i, demand in enumerate(series):
        now = start + i
        scaler.observe(now, demand)
        decision = scaler.decide(now, current)
        out.append(decision)
        if follow:
            current = decision.desired
    return out


def settings(**kw: float) -> AutoscaleSettings:
    base: dict[str, float] = {"min_replicas": 1, "max_replicas": 4, "target": 10.0, "stable_window_s": 60.0,
                              "panic_window_s": 6.0, "panic_threshold": 2.0}
    return AutoscaleSettings(**(base | kw))  # type: ignore[arg-type]


def test_a_burst_to_twice_the_capacity_scales_up_within_the_panic_window() -> None:
    scaler = Autoscaler(settings())
    quiet = run(scaler, [5.0] * 60, current=1)
    assert {d.desired for d in quiet} == {1} and not any(d.panic for d in quiet)
    burst = run(scaler, [40.0] * 6, start=60, current=1)
    # panic average after k burst seconds of 6: (40k + 5(6-k)) / 6 >= 2 x 1 x 10 from k = 3 on
    first = next(i for i, d in enumerate(burst) if d.direction == "up")
    assert first == 2 and burst[first].panic
    assert burst[first].desired == 3  # ceil(panic average 22.5 / 10), not the stable average's 1
    assert burst[-1].desired == 4  # ceil(40 / 10)


def test_below_the_panic_threshold_only_the_stable_window_scales_up() -> None:
    scaler = Autoscaler(settings())
    decisions = run(scaler, [15.0] * 30, current=1)  # 1.5x capacity: never panic
    assert not any(d.panic for d in decisions)
    assert all(d.desired == 2 for d in decisions)  # ceil(15 / 10): the stable average asks for 2 at once


def test_panic_holds_the_count_until_a_stable_window_passes_without_a_trigger() -> None:
    scaler = Autoscaler(settings())
    run(scaler, [40.0] * 10, current=1, follow=True)
    after = run(scaler, [0.0] * 80, start=10, current=4)
    # the only trigger was at t=0: once 4 replicas ran, 40 was never 2 x their capacity (80)
    in_panic = [d for d in after if d.panic]
    assert in_panic and all(d.desired == 4 for d in in_panic)  # never down in panic
    calm = [d for d in after if not d.panic]
    assert calm and calm[0].desired < 4  # then the stable window decides
    assert len(in_panic) == 60 - 10  # panic until t = 0 + 60 (exclusive); this series starts at t = 10


def test_scale_down_follows_the_stable_average_not_the_last_seconds() -> None:
    scaler = Autoscaler(settings(panic_threshold=100.0))  # no panic in this test
    run(scaler, [30.0] * 60, current=3)
    decisions = run(scaler, [0.0] * 60, start=60, current=3)
    desired = [d.desired for d in decisions]
    # decision i sees i + 1 idle seconds: the 60 s average is 30 (59 - i) / 60, which asks for 3 until it is at
    # most 20 (i = 19), then 2 until at most 10 (i = 39), then 1
    assert desired[:19] == [3] * 19
    assert desired[19:39] == [2] * 20
    assert desired[39:] == [1] * 21
    assert all(not d.panic for d in decisions)


def test_no_scale_down_before_a_whole_stable_window_was_observed() -> None:
    scaler = Autoscaler(settings(panic_threshold=100.0))
    decisions = run(scaler, [0.0] * 61, current=3)
    assert [d.desired for d in decisions[:60]] == [3] * 60
    assert decisions[60].desired == 1


@pytest.mark.parametrize(("series", "current", "expected"), [
    ([0.0] * 70, 1, 1),          # idle: never below MIN
    ([1000.0] * 10, 1, 4),       # far beyond: never above MAX
    ([0.0] * 70, 2, 2),          # MIN = 2 holds two even when idle
])
def test_bounds(series: list[float], current: int, expected: int) -> None:
    low = 2 if current == 2 else 1
    scaler = Autoscaler(settings(min_replicas=low))
    assert run(scaler, series, current=current)[-1].desired == expected


def test_a_decision_line_carries_the_numbers() -> None:
    scaler = Autoscaler(settings())
    decision = run(scaler, [64.0] * 3, current=1)[-1]
    line = str(decision)
    assert line.startswith("autoscale: up 1 -> 4 executors: demand 64 now")
    assert "64.0 panic window" in line and "target 10/replica" in line and "PANIC" in line


def test_settings_and_cli_bounds() -> None:
    assert AutoscaleSettings.parse_bounds("1:2") == (1, 2)
    assert AutoscaleSettings.parse_bounds("3") == (3, 3)
    for bad in ("2:1", "0:2", "a:b", "1:"):
        with pytest.raises(ValueError, match="MIN"):
            AutoscaleSettings.parse_bounds(bad)
    with pytest.raises(AssertionError):
        AutoscaleSettings(min_replicas=1, max_replicas=2, panic_window_s=90.0)
    args = argparse.Namespace(autoscale="1:3", autoscale_target=8.0, autoscale_windows="20:2")
    got = autoscale_settings(args)
    assert got is not None and (got.min_replicas, got.max_replicas, got.target) == (1, 3, 8.0)
    assert (got.stable_window_s, got.panic_window_s) == (20.0, 2.0)
    with pytest.raises(ValueError, match="PANIC <= STABLE"):
        autoscale_settings(argparse.Namespace(autoscale="1:3", autoscale_target=8.0, autoscale_windows="2:20"))


def test_the_router_follows_the_executors_file_under_autoscale(tmp_path: object) -> None:
    cfg = StackConfig(state_dir=tmp_path, ports=dict.fromkeys(StackConfig().ports, 0),  # type: ignore[arg-type]
                      autoscale=AutoscaleSettings(min_replicas=2, max_replicas=3))
    assert cfg.executors == 2  # the stack starts MIN executors
    settings_ = stack_settings(cfg, cfg.resolved_ports())
    assert settings_["router"]["executor_addrs"] == [f"file://{cfg.state_dir.resolve() / 'executors'}"]
    assert {"executor", "executor_2"} <= set(settings_) and "executor_3" not in settings_


def test_a_new_replica_loads_the_models_with_traffic_in_the_stable_window() -> None:
    traffic = ModelTraffic(window_s=60.0)
    traffic.observe(0.0, "executor", {"tiny-llama": 0.0, "all-minilm-l6-v2": 5.0})  # 5 before we looked: seen
    assert traffic.hot(0.0) == ["all-minilm-l6-v2"]
    traffic.observe(10.0, "executor", {"tiny-llama": 40.0, "all-minilm-l6-v2": 5.0})
    assert traffic.hot(10.0) == ["all-minilm-l6-v2", "tiny-llama"]
    traffic.observe(61.0, "executor", {"tiny-llama": 90.0, "all-minilm-l6-v2": 5.0})  # embeddings idle for 61 s
    assert traffic.hot(61.0) == ["tiny-llama"]
    # a second replica's counters count on their own: its first sight above zero is growth too
    traffic.observe(100.0, "executor_2", {"all-minilm-l6-v2": 1.0})
    assert traffic.hot(100.0) == ["all-minilm-l6-v2", "tiny-llama"]
    assert traffic.hot(200.0) == []
    # a replica that stops and comes back under the same name starts from zero again
    traffic.forget("executor_2")
    traffic.observe(201.0, "executor_2", {"all-minilm-l6-v2": 1.0})
    assert traffic.hot(201.0) == ["all-minilm-l6-v2"]
    # streams in progress count before any of them has ended (Triton counts a streamed request at its end)
    traffic.observe(300.0, "executor", {"tiny-llama": 90.0}, busy={"tiny-llama": 64.0, "all-minilm-l6-v2": 0.0})
    assert traffic.hot(300.0) == ["tiny-llama"]


TRITON_PAGE = """# TYPE nv_inference_request_success counter
nv_inference_request_success{model="tiny-llama",version="1"} 40
nv_inference_request_success{model="all-minilm-l6-v2",version="1"} 0
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="all-minilm-l6-v2",version="1"} 3
# TYPE inferplane_llm_active_sequences gauge
inferplane_llm_active_sequences{model="tiny-llama"} 0
"""
EXECUTOR_PAGE = """# TYPE inferplane_executor_active_requests gauge
inferplane_executor_active_requests 5
# TYPE inferplane_executor_queue_depth gauge
inferplane_executor_queue_depth 1
"""
ROUTER_PAGE = """# TYPE inferplane_router_model_queued gauge
inferplane_router_model_queued{model="tiny-llama"} 2
"""


class _MetricsPages:
    """Real HTTP metrics pages on an ephemeral port, counting the GETs of each path."""

    def __init__(self, pages: dict[str, str]) -> None:
        hits: Counter[str] = Counter()
        self.hits = hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits[self.path] += 1
                body = pages[self.path].encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def metrics_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_measure_fetches_each_triton_page_once_and_reads_traffic_and_busy_from_it() -> None:
    pages = _MetricsPages({"/executor": EXECUTOR_PAGE, "/triton": TRITON_PAGE, "/router": ROUTER_PAGE})
    try:
        scaler = ExecutorScaler(stack=pages, settings=settings())  # type: ignore[arg-type]
        scaler.replicas["executor"] = ExecutorReplica("executor", "serving")
        scaler.traffic = ModelTraffic(window_s=60.0)
        assert ROUTER_DEMAND_METRICS == ("inferplane_router_model_queued",)
        assert scaler.measure() == 5 + 1 + 2  # the executor's active + queued, the router's queued
        assert pages.hits == {"/executor": 1, "/triton": 1, "/router": 1}
        # tiny-llama holds nothing now but its counter grew (Triton writes it without _total: read under its own
        # name); all-minilm-l6-v2 counted nothing yet but holds 3 pending requests
        assert scaler.traffic.hot(time.monotonic()) == ["all-minilm-l6-v2", "tiny-llama"]
    finally:
        pages.close()


def test_sum_by_model_reads_several_groups_from_one_page() -> None:
    totals, busy = sum_by_model(TRITON_PAGE, (TRITON_TRAFFIC_COUNTER,), TRITON_BUSY_GAUGES)
    assert totals == {"tiny-llama": 40.0, "all-minilm-l6-v2": 0.0}
    assert busy == {"all-minilm-l6-v2": 3.0, "tiny-llama": 0.0}
