"""``inferplane up --autoscale MIN:MAX``: executor replicas that follow the load, on one machine.

Every ``tick_s`` the launcher reads each executor's Prometheus metrics and the router's, and sums the
**demand**: per executor ``inferplane_executor_active_requests`` (sequences in progress) plus
``inferplane_executor_queue_depth`` (those without a first token yet, which therefore count twice: a backlog
of prefills is the first sign of a saturated replica), plus the router's ``inferplane_router_model_queued``
(requests waiting for an executor slot). ``Autoscaler`` turns that series into a replica count the way
Knative's autoscaler does, with its default windows (a laptop's Triton starts in tens of seconds, like a pod):

- desired = ceil(average demand / ``target`` per replica), averaged over the **stable window** (60 s);
- **panic**: when the **panic window**'s average (6 s) reaches ``panic_threshold`` (2×) the capacity of the
  replicas there are (replicas × target), the count follows the panic average at once and never goes down
  until a whole stable window has passed without that condition;
- scale down only on the stable window's average, and only once a whole window has been observed;
- never below MIN nor above MAX.

``ExecutorScaler`` acts on a ``LocalStack``: scale up starts a new executor (``executor_N``: its own Triton,
free ports, a section in ``stack.yaml``) and, once it is SERVING, adds its address to the executors file every
router follows (``file://``, see ``inferplane.router.replicas``); scale down removes the newest replica from
that file first (routers send it nothing new and keep their streams on it), waits until the executor has no
generation in progress, then stops it (SIGTERM: the executor's own drain, docs/executor.md). A new replica
loads at start only the Triton models that took requests in the last stable window (``ModelTraffic``, from each
Triton's per-model success counters), so that it serves sooner; the others load on their first request there
(explicit model control: the request waits for the load). A decision that
changes the count, and panic starting or ending, is one log line with the numbers; every tick's figures are
gauges on the launcher's /metrics (``inferplane_autoscaler_*``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from inferplane.cli.launcher import LocalStack

log = logging.getLogger(__name__)

DEMAND = Gauge("inferplane_autoscaler_demand",
               "Executor demand (active + queued sequences, + the router's queue): now and averaged per window",
               ["window"])
DESIRED = Gauge("inferplane_autoscaler_desired_replicas", "Executor replicas the last decision asked for")
REPLICAS = Gauge("inferplane_autoscaler_replicas", "Executor replicas, by state", ["state"])
PANIC = Gauge("inferplane_autoscaler_panic", "1 while the autoscaler is in panic mode")
TARGET = Gauge("inferplane_autoscaler_target", "Demand per replica the autoscaler aims at")
DECISIONS = Counter("inferplane_autoscaler_decisions", "Decisions that changed the replica count, by direction",
                    ["direction"])
START_SECONDS = Histogram("inferplane_autoscaler_replica_start_seconds",
                          "From a scale-up decision to the new executor SERVING",
                          buckets=(5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300))

# The executor's and the router's gauges the demand is summed from (docs/executor.md, docs/router.md).
EXECUTOR_DEMAND_METRICS = ("inferplane_executor_active_requests", "inferplane_executor_queue_depth")
# Which models a new replica loads at start (ModelTraffic): Triton's per-model count of requests it answered, and
# the gauges of requests it holds now (a streamed generation is counted as answered only at its end).
TRITON_TRAFFIC_COUNTER = "nv_inference_request_success"
TRITON_BUSY_GAUGES = ("nv_inference_pending_request_count", "inferplane_llm_active_sequences",
                      "inferplane_llm_queued_requests")
ROUTER_DEMAND_METRICS = ("inferplane_router_model_queued",)


@dataclass(frozen=True)
class AutoscaleSettings:
    """Bounds, target and windows (Knative's defaults: 60 s stable, 6 s panic at 2× capacity)."""

    min_replicas: int = 1
    max_replicas: int = 1
    # Demand (active + queued sequences) one replica should carry.
    target: float = 16.0
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    tick_s: float = 1.0
    # Scale down: how long a removed replica's generations may take to finish before it is stopped anyway.
    drain_timeout_s: float = 300.0
    # After a replica failed to start, no new start for this long.
    start_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        assert 1 <= self.min_replicas <= self.max_replicas, \
            f"autoscale bounds need 1 <= MIN <= MAX, not {self.min_replicas}:{self.max_replicas}"
        assert self.target > 0, "the target demand per replica must be positive"
        assert 0 < self.panic_window_s <= self.stable_window_s, "the panic window must fit in the stable window"
        assert self.panic_threshold > 1, "the panic threshold is a multiple of the capacity, above 1"

    @classmethod
    def parse_bounds(cls, text: str) -> tuple[int, int]:
        """``MIN:MAX`` (``2`` alone: 2:2)."""
        lo, sep, hi = text.partition(":")
        try:
            low, high = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError(f"--autoscale takes MIN:MAX (e.g. 1:2), not {text!r}") from None
        if not 1 <= low <= high:
            raise ValueError(f"--autoscale needs 1 <= MIN <= MAX, not {text!r}")
        return low, high


@dataclass(frozen=True)
class Decision:
    """One tick's verdict and the numbers behind it."""

    current: int
    desired: int
    demand: float
    stable: float
    panic_avg: float
    panic: bool
    target: float
    # Seconds of the series the stable average covers (less than the window right after start).
    observed_s: float

    @property
    def direction(self) -> str:
        return "up" if self.desired > self.current else "down" if self.desired < self.current else "hold"

    def __str__(self) -> str:
        return (f"autoscale: {self.direction} {self.current} -> {self.desired} executors: demand {self.demand:g} "
                f"now, {self.stable:.1f} stable ({self.observed_s:.0f}s), {self.panic_avg:.1f} panic window; "
                f"target {self.target:g}/replica, capacity {self.current * self.target:g}"
                f"{', PANIC' if self.panic else ''}")


class Autoscaler:
    """The decision alone: a demand series in, a replica count out (no clock of its own, no I/O)."""

    def __init__(self, settings: AutoscaleSettings) -> None:
        self.settings = settings
        self._samples: deque[tuple[float, float]] = deque()
        self._first: float | None = None
        self._panic_until = -math.inf

    def observe(self, now: float, demand: float) -> None:
        self._samples.append((now, demand))
        if self._first is None:
            self._first = now
        while self._samples and self._samples[0][0] <= now - self.settings.stable_window_s:
            self._samples.popleft()

    def _average(self, now: float, window: float) -> float:
        values = [d for t, d in self._samples if t > now - window]
        return sum(values) / len(values) if values else 0.0

    def decide(self, now: float, current: int) -> Decision:
        s = self.settings
        stable = self._average(now, s.stable_window_s)
        panic_avg = self._average(now, s.panic_window_s)
        want_stable = math.ceil(stable / s.target)
        want_panic = math.ceil(panic_avg / s.target)
        if current > 0 and panic_avg >= s.panic_threshold * current * s.target:
            self._panic_until = now + s.stable_window_s  # panic lasts a stable window past its last trigger
        panic = now < self._panic_until
        observed = now - self._first if self._first is not None else 0.0
        if panic:
            desired = max(current, want_panic, want_stable)  # never down in panic
        elif want_stable < current and observed < s.stable_window_s:
            desired = current  # not a whole stable window seen yet: no scale-down on a partial one
        else:
            desired = want_stable
        desired = min(s.max_replicas, max(s.min_replicas, desired))
        demand = self._samples[-1][1] if self._samples else 0.0
        return Decision(current=current, desired=desired, demand=demand, stable=stable, panic_avg=panic_avg,
                        panic=panic, target=s.target, observed_s=min(observed, s.stable_window_s))


def fetch_metrics(url: str, timeout: float = 0.5) -> str | None:
    """A Prometheus endpoint's page; None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def _samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample on a metrics page, a counter's under the name its exporter wrote: the
    parser calls Triton's ``nv_inference_request_success`` samples ``nv_inference_request_success_total``."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = family.name if family.type == "counter" and sample.name == family.name + "_total" else sample.name
            yield name, sample.labels, sample.value


def scrape(url: str, names: tuple[str, ...], timeout: float = 0.5) -> float | None:
    """The sum of every sample of ``names`` at a Prometheus endpoint; None when it does not answer."""
    text = fetch_metrics(url, timeout)
    if text is None:
        return None
    return sum(value for name, _, value in _samples(text) if name in names)


def sum_by_model(text: str, *groups: tuple[str, ...]) -> list[dict[str, float]]:
    """For each group of metric names, each ``model`` label's sum of those samples on one metrics page: one parse
    of the page, however many groups."""
    out: list[dict[str, float]] = [{} for _ in groups]
    for name, labels, value in _samples(text):
        model = labels.get("model")
        if model is None:
            continue
        for names, sums in zip(groups, out, strict=True):
            if name in names:
                sums[model] = sums.get(model, 0.0) + value
    return out


class ModelTraffic:
    """Which Triton models took requests within the last ``window_s``, from each replica's per-model counters.

    ``observe(now, replica, totals, busy)`` takes one replica's counter totals and its gauges of requests held now;
    a model is *hot* from a tick at which its total grew (or was first seen above zero) or it held requests, until
    ``window_s`` after. No clock or I/O of its own."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._totals: dict[tuple[str, str], float] = {}
        self._grew: dict[str, float] = {}

    def observe(self, now: float, replica: str, totals: dict[str, float],
                busy: dict[str, float] | None = None) -> None:
        for model, held in (busy or {}).items():
            if held > 0:
                self._grew[model] = now
        for model, total in totals.items():
            before = self._totals.get((replica, model), 0.0)
            if total > before:
                self._grew[model] = now
            self._totals[(replica, model)] = total

    def forget(self, replica: str) -> None:
        """A replica stopped: its counters restart from zero if the name comes back."""
        for key in [k for k in self._totals if k[0] == replica]:
            del self._totals[key]

    def hot(self, now: float) -> list[str]:
        return sorted(m for m, t in self._grew.items() if now - t <= self.window_s)


@dataclass
class ExecutorReplica:
    name: str
    state: str  # "starting", "serving", "draining"
    address: str = ""


@dataclass
class ExecutorScaler:
    """The autoscaler's thread in ``inferplane up``: measure, decide, start or drain executors."""

    stack: LocalStack
    settings: AutoscaleSettings
    log: Callable[[str], None] = print
    replicas: dict[str, ExecutorReplica] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    _worker: threading.Thread | None = None
    _no_start_until: float = 0.0

    @property
    def executors_file(self) -> Path:
        return self.stack.executors_file

    def start(self) -> None:
        """Take over the executors the stack started (its MIN) and run the loop."""
        for name in self.stack.executor_names:
            self.replicas[name] = ExecutorReplica(name, "serving", self.stack.executor_addr(name))
        self.autoscaler = Autoscaler(self.settings)
        self.traffic = ModelTraffic(self.settings.stable_window_s)
        TARGET.set(self.settings.target)
        self._gauges()
        self._thread = threading.Thread(target=self._run, name="autoscaler", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for thread in (self._thread, self._worker):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)

    # --- the loop -------------------------------------------------------------------------------------

    def _run(self) -> None:
        was_panic = False
        while not self._stop.wait(self.settings.tick_s):
            try:
                was_panic = self._tick(time.monotonic(), was_panic)
            except Exception:  # the loop outlives one bad tick (a metrics page that does not parse)
                log.exception("autoscaler tick failed")

    def measure(self) -> float | None:
        """Demand now: the executors' (serving or draining) and the router's; None when no executor answers."""
        with self._lock:
            live = [r.name for r in self.replicas.values() if r.state != "starting"]
        found = [scrape(self.stack.metrics_url(name), EXECUTOR_DEMAND_METRICS) for name in live]
        now = time.monotonic()
        for name in live:
            url = self.stack.metrics_url("triton" + name.removeprefix("executor"))
            page = fetch_metrics(url)  # one fetch per replica and tick, read for both the counter and the gauges
            if page is not None:
                totals, busy = sum_by_model(page, (TRITON_TRAFFIC_COUNTER,), TRITON_BUSY_GAUGES)
                self.traffic.observe(now, name, totals, busy)
        answered = [v for v in found if v is not None]
        if not answered:
            return None
        queued = scrape(self.stack.metrics_url("router"), ROUTER_DEMAND_METRICS)
        return sum(answered) + (queued or 0.0)

    def _tick(self, now: float, was_panic: bool) -> bool:
        demand = self.measure()
        if demand is not None:
            self.autoscaler.observe(now, demand)
        with self._lock:
            current = sum(r.state != "draining" for r in self.replicas.values())
            busy = self._worker is not None and self._worker.is_alive()
        decision = self.autoscaler.decide(now, current)
        DEMAND.labels("now").set(decision.demand)
        DEMAND.labels("stable").set(decision.stable)
        DEMAND.labels("panic").set(decision.panic_avg)
        DESIRED.set(decision.desired)
        PANIC.set(1 if decision.panic else 0)
        if decision.direction == "hold" or busy:
            if decision.panic != was_panic:
                self.log(f"{decision} ({'panic starts' if decision.panic else 'panic ends'})")
            return decision.panic
        if decision.direction == "up" and time.monotonic() < self._no_start_until:
            return decision.panic
        self.log(str(decision))
        DECISIONS.labels(decision.direction).inc()
        act = self._scale_up if decision.direction == "up" else self._scale_down
        count = abs(decision.desired - decision.current)
        self._worker = threading.Thread(target=act, args=(count, now), name=f"autoscale-{decision.direction}",
                                        daemon=True)
        self._worker.start()
        return decision.panic

    def _gauges(self) -> None:
        with self._lock:
            states = [r.state for r in self.replicas.values()]
        for state in ("starting", "serving", "draining"):
            REPLICAS.labels(state).set(states.count(state))

    # --- actions (on the worker thread) ---------------------------------------------------------------

    def _write_file(self) -> None:
        with self._lock:
            addresses = [r.address for r in self.replicas.values() if r.state == "serving"]
        self.stack.write_executors_file(addresses)

    def _scale_up(self, count: int, decided_at: float) -> None:
        for _ in range(count):
            if self._stop.is_set():
                return
            hot = self.traffic.hot(time.monotonic())
            name = self.stack.add_executor_section(load_at_start=hot or None)
            self.log(f"autoscale: {name} starts with {', '.join(hot)} loaded (traffic in the last "
                     f"{self.settings.stable_window_s:.0f}s); other models load on their first request there"
                     if hot else f"autoscale: {name} starts with every model loaded (none took traffic lately)")
            with self._lock:
                self.replicas[name] = ExecutorReplica(name, "starting", self.stack.executor_addr(name))
            self._gauges()
            try:
                self.stack.spawn(name)
            except Exception as exc:  # a replica that cannot start: back off, the stack keeps what it has
                self.log(f"autoscale: {name} did not start: {exc}; no new start for "
                         f"{self.settings.start_backoff_s:.0f}s")
                self._no_start_until = time.monotonic() + self.settings.start_backoff_s
                self.stack.supervisor.stop(name)
                self.stack.remove_executor_section(name)
                with self._lock:
                    del self.replicas[name]
                self._gauges()
                return
            with self._lock:
                self.replicas[name].state = "serving"
            self._write_file()
            seconds = time.monotonic() - decided_at
            START_SECONDS.observe(seconds)
            self._gauges()
            self.log(f"autoscale: {name} SERVING {seconds:.1f}s after the decision; added to the routers "
                     f"({self.executors_file})")

    def _scale_down(self, count: int, decided_at: float) -> None:
        with self._lock:
            # the newest first; the stack's first executor (MIN >= 1) is never removed
            extra = [r for r in self.replicas.values() if r.state == "serving" and r.name != "executor"]
            chosen = extra[::-1][:count]
            for replica in chosen:
                replica.state = "draining"
        self._gauges()
        if not chosen:
            return
        self._write_file()
        # The routers re-read the file each second: give them two before the executor refuses new work.
        time.sleep(2.5)
        for replica in chosen:
            started = time.monotonic()
            left = self._wait_idle(replica.name)
            self.stack.supervisor.hold(replica.name)
            self.stack.supervisor.stop(replica.name)  # SIGTERM: the executor drains what is left, then exits
            self.stack.remove_executor_section(replica.name)
            self.traffic.forget(replica.name)
            with self._lock:
                del self.replicas[replica.name]
            self._gauges()
            note = f", {left:g} generations still running at the drain timeout" if left else ""
            self.log(f"autoscale: {replica.name} drained in {time.monotonic() - started:.1f}s and stopped{note}")

    def _wait_idle(self, name: str) -> float:
        """Wait until the executor has no generation in progress (or the drain timeout); what is left."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        url = self.stack.metrics_url(name)
        while True:
            active = scrape(url, ("inferplane_executor_active_requests",))
            if not active or time.monotonic() >= deadline:  # 0, or an executor that no longer answers
                return active or 0.0
            time.sleep(0.2)
