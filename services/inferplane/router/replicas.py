"""Executor replicas: discovery (static, DNS or a file), health (gRPC health Watch), load, choice, ejection.

The router keeps one ``Replica`` per executor endpoint. A replica takes requests while its health
stream says SERVING (an executor that drains flips to NOT_SERVING and gets nothing new at once) and it
is not ejected; a replica that fails a call is ejected with exponential backoff and returns after the
backoff, or at once when its health goes from down (or NOT_SERVING) to SERVING: a restarted executor starts
afresh. Choice (``policy``), among replicas that serve the model: ``cache_aware`` (the replica that holds the
longest run of the prompt's leading blocks in its prefix cache, as it reports them or else as guessed,
``prefix_index.py``, unless the match is poor or that replica is overloaded: then as ``p2c``), ``p2c`` (power of
two choices on the least outstanding requests: this router's own in-flight calls plus the executor's reported queue)
or ``random``. A pinned session goes first.

With ``channel_silence_s`` set, each replica also has an ``ExecutorChannel`` (``channel.py``): the one
long-lived ``Channel`` stream that carries all of this router's generations on that replica, and (``cache_aware``)
the replica's prefix-cache block reports into the index, opened as soon as the replica is SERVING.

Discovery: a ``host:port`` target is one replica for good; ``dns:///name:port`` is one replica per address the
name resolves to, re-resolved every ``dns_interval_s``; ``file:///path`` is one replica per line of that file
(``host:port``; blank lines and ``#`` comments skipped), re-read when it changes (``inferplane up --autoscale``
writes it). A replica that leaves a DNS answer or a file *retires*: it gets no new request at once, and is
closed once the requests it holds have ended (bounded by ``retire_timeout_s``), so removing a replica never
cuts a stream.

``ReplicaSet.open(model, start)`` is the one way a request reaches an executor: it picks a replica, counts the
request as outstanding there until the request is done, and retries ``start`` once on another replica when a
replica fault happens before anything reached the caller, within the retry budget.

Scale to zero (docs/model-control.md): each executor's ``GetStatus`` lists the models of its repository and
whether each is loaded. A request for a model that no live replica has loaded, but some replica can load, first
asks that replica to load it (``LoadModel``, one load per model however many requests wait: the others wait in the
model's admission queue, whose capacity is zero until the load ends), bounded by the request's deadline; the
progress is logged, and the load's duration is ``inferplane_router_model_cold_start_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from inferplane.common.errors import DeadlineExceeded, Unavailable
from inferplane.common.server import channel_options
from inferplane.router.channel import ExecutorChannel
from inferplane.router.prefix_index import Policy, Prefix, PrefixIndex, choose_cached, power_of_two
from inferplane.v1 import common_pb2, executor_pb2, executor_pb2_grpc

log = logging.getLogger(__name__)

REPLICAS = Gauge("inferplane_router_executor_replicas", "Executor replicas known, by state", ["state"])
EJECTIONS = Counter("inferplane_router_executor_ejections", "Replicas ejected after a failed call")
AFFINITY = Counter("inferplane_router_session_affinity", "Requests of a pinned session: kept on its replica, or moved",
                   ["outcome"])
ROUTED = Counter("inferplane_router_routing_decisions",
                 "Replica choices by policy and outcome (cache_aware: cached, poor_match, imbalanced)",
                 ["policy", "outcome"])
RETRIES = Counter("inferplane_router_retries", "Requests retried on another replica before their first token")
LOADS = Counter("inferplane_router_model_loads", "Models this router asked an executor to load (scale from zero)",
                ["model", "outcome"])
COLD_START = Histogram("inferplane_router_model_cold_start_seconds",
                       "From a request finding its model loaded nowhere to the model loaded on an executor", ["model"],
                       buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
DNS_PREFIX = "dns:///"
FILE_PREFIX = "file://"
T = TypeVar("T")


@dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: executor_pb2_grpc.ExecutorServiceStub
    serving: bool = False
    outstanding: int = 0
    reported_active: int = 0
    models: set[str] = field(default_factory=set)
    ejected_until: float = 0.0
    failures: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # The generations' channel to this executor; None: one Generate call per request.
    link: ExecutorChannel | None = None
    # Gone from discovery: no new request; closed once ``outstanding`` is 0.
    retiring: bool = False
    # Whether a GetStatus answered yet (before: ``models`` is not known, and the replica may serve any model).
    reported: bool = False
    # Every model of its repository -> its state (common_pb2.ModelState); a model here but not in ``models`` can
    # be loaded on this replica.
    states: dict[str, int] = field(default_factory=dict)

    def available(self, now: float) -> bool:
        return self.serving and not self.retiring and now >= self.ejected_until

    def load(self) -> int:
        return self.outstanding + self.reported_active

    def eject(self, now: float, base_s: float, max_s: float) -> float:
        self.failures += 1
        backoff = min(max_s, base_s * 2 ** (self.failures - 1))
        self.ejected_until = now + backoff
        EJECTIONS.inc()
        return backoff

    def succeeded(self) -> None:
        self.failures = 0

    def recovered(self) -> None:
        """Its health says SERVING again after it was down or not serving: a restarted executor is a new process,
        so the ejection its predecessor earned ends now (32 streams failing at once had doubled it to the cap)."""
        self.failures = 0
        self.ejected_until = 0.0


class RetryBudget:
    """Retries may add at most ``ratio`` of the requests, plus a burst: attempts ≤ (1 + ratio) × requests + burst.

    The burst lets every request that was waiting on a replica that just died move to a live one (one replica
    of two holding 32 queued requests); the ratio stops a retry storm when failures persist.
    """

    def __init__(self, ratio: float = 0.2, burst: float = 50.0) -> None:
        self.ratio = ratio
        self.burst = burst
        self.tokens = burst

    def on_request(self) -> None:
        self.tokens = min(self.burst, self.tokens + self.ratio)

    def try_spend(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Affinity:
    """Session affinity: a session (its ``x-session-id``, else its ``user``) keeps going to the replica it went to,
    per model. A bounded LRU (``max_sessions``) whose entries expire ``idle_s`` after their last use; the pinned
    replica is used while it can take the model and is not overloaded (its load at most ``max_imbalance`` above the
    least-loaded candidate's), else the request is picked as any other and the session pinned to the new replica."""

    def __init__(self, *, max_sessions: int = 10_000, idle_s: float = 300.0, max_imbalance: int = 8) -> None:
        self.max_sessions = max_sessions
        self.idle_s = idle_s
        self.max_imbalance = max_imbalance
        self._pins: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()  # oldest use first

    def __len__(self) -> int:
        return len(self._pins)

    def pinned(self, model: str, session: str, candidates: list[Replica], now: float) -> Replica | None:
        """The session's replica among ``candidates`` if it may take the request now (None: pick as usual)."""
        self._expire(now)
        entry = self._pins.get((model, session))
        if entry is None:
            return None
        replica = next((r for r in candidates if r.address == entry[0]), None)
        if replica is None or replica.load() > min(r.load() for r in candidates) + self.max_imbalance:
            AFFINITY.labels("moved").inc()
            return None
        AFFINITY.labels("kept").inc()
        return replica

    def pin(self, model: str, session: str, replica: Replica, now: float) -> None:
        key = (model, session)
        self._pins[key] = (replica.address, now)
        self._pins.move_to_end(key)
        while len(self._pins) > self.max_sessions:
            self._pins.popitem(last=False)

    def _expire(self, now: float) -> None:
        while self._pins:
            key, (_, used) = next(iter(self._pins.items()))
            if now - used <= self.idle_s:
                return
            del self._pins[key]


def choose(candidates: list[Replica], rng: random.Random) -> Replica:
    """Power of two choices: the less loaded of two random replicas (ties: the first drawn)."""
    return power_of_two(candidates, rng)


class ReplicaSet:
    def __init__(self, targets: list[str], *, channel_factory: Callable[[str], grpc.aio.Channel],
                 status_interval_s: float = 1.0, dns_interval_s: float = 5.0, eject_base_s: float = 1.0,
                 eject_max_s: float = 30.0, retry_ratio: float = 0.2, retry_burst: float = 50.0,
                 seed: int | None = None, channel_silence_s: float | None = None, file_interval_s: float = 1.0,
                 retire_timeout_s: float = 600.0, load_timeout_s: float = 300.0,
                 affinity: Affinity | None = None, policy: Policy = "cache_aware", cache_max_imbalance: int = 8,
                 cache_min_match: float = 0.1) -> None:
        """``channel_silence_s``: generations go over one ``ExecutorChannel`` per replica, broken when it stays
        silent that long with sequences live; None: one ``Generate`` call per request. ``load_timeout_s``: the
        longest a model load (scale from zero) may take, and the wait of a request that gives no deadline.
        ``policy``: how a replica is chosen (``cache_aware``: ``choose_cached`` with ``cache_max_imbalance`` and
        ``cache_min_match``)."""
        if not targets:
            raise ValueError("at least one executor address is required")
        self._targets = targets
        self._channel_factory = channel_factory
        self._status_interval = status_interval_s
        self._dns_interval = dns_interval_s
        self._file_interval = file_interval_s
        self._retire_timeout = retire_timeout_s
        self._eject_base, self._eject_max = eject_base_s, eject_max_s
        self._channel_silence_s = channel_silence_s
        self._load_timeout_s = load_timeout_s
        self._loads: dict[str, asyncio.Future[None]] = {}  # model -> its load in flight (one per model)
        self.replicas: dict[str, Replica] = {}
        # What each DNS or file target found last.
        self._found: dict[str, set[str]] = {}
        self.budget = RetryBudget(retry_ratio, retry_burst)
        self._rng = random.Random(seed)
        self._tasks: list[asyncio.Task[None]] = []
        # called when a replica's state changes (the router's capacity lets queued requests in)
        self.on_change: Callable[[], None] | None = None
        self.affinity = affinity if affinity is not None else Affinity()
        self.policy: Policy = policy
        self.cache_max_imbalance = cache_max_imbalance
        self.cache_min_match = cache_min_match
        self.index = PrefixIndex()  # cache_aware's: the blocks each replica holds (reported, else guessed)

    # --- membership -------------------------------------------------------------------------------

    @property
    def _static(self) -> set[str]:
        return {t for t in self._targets if not t.startswith((DNS_PREFIX, FILE_PREFIX))}

    async def start(self) -> None:
        dns = [t for t in self._targets if t.startswith(DNS_PREFIX)]
        if dns:
            await self._resolve(dns)
            self._tasks.append(asyncio.create_task(self._watch_dns(dns)))
        for target in self._targets:
            if target.startswith(FILE_PREFIX):  # read once now: readiness waits on the replicas it names
                path = target[len(FILE_PREFIX):]
                stamp = file_stamp(path)
                self._found[target] = read_addresses(path) or set()
                self._tasks.append(asyncio.create_task(self._watch_file(target, path, stamp)))
        self._sync()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for address in list(self.replicas):
            await self._remove(address)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _add(self, address: str) -> None:
        channel = self._channel_factory(address)
        replica = Replica(address, channel, executor_pb2_grpc.ExecutorServiceStub(channel))
        if self._channel_silence_s is not None:
            # A connection of its own, without the tracing interceptors: the channel's call outlives every request
            # (each sequence carries its own traceparent).
            replica.link = ExecutorChannel(address, grpc.aio.insecure_channel(address, options=channel_options()),
                                           silence_s=self._channel_silence_s,
                                           blocks=self.index if self.policy == "cache_aware" else None)
        replica.tasks = [asyncio.create_task(self._watch_health(replica)),
                         asyncio.create_task(self._poll_status(replica))]
        self.replicas[address] = replica
        log.info("executor replica added: %s", address)
        self._gauges()

    async def _remove(self, address: str) -> None:
        replica = self.replicas.pop(address)
        self.index.forget(address)
        for task in replica.tasks:
            task.cancel()
        for task in replica.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if replica.link is not None:
            await replica.link.close()
        await replica.channel.close(None)
        log.info("executor replica removed: %s", address)
        self._gauges()

    async def _resolve(self, targets: list[str]) -> None:
        """``dns:///host:port`` (a Kubernetes headless Service): one replica per A/AAAA record."""
        loop = asyncio.get_running_loop()
        for target in targets:
            host, _, port = target[len(DNS_PREFIX):].rpartition(":")
            try:
                infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("cannot resolve %s: %s", target, exc)
                continue  # keep what it found last
            found = set()
            for family, _, _, _, sockaddr in infos:
                ip = str(sockaddr[0])
                found.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
            self._found[target] = found
        self._sync()

    def _sync(self) -> None:
        """Add what discovery found that is new; retire what no target names any more."""
        wanted = self._static.union(*self._found.values())
        for address in sorted(wanted):
            replica = self.replicas.get(address)
            if replica is None:
                self._add(address)
            elif replica.retiring:  # named again before its retirement ended
                replica.retiring = False
                log.info("executor replica %s is back", address)
                self._gauges()
        for address in set(self.replicas) - wanted:
            replica = self.replicas[address]
            if not replica.retiring:
                replica.retiring = True
                log.info("executor replica %s retiring (%d requests to finish)", address, replica.outstanding)
                self._gauges()
                self._tasks = [t for t in self._tasks if not t.done()]  # earlier retirements that ended
                self._tasks.append(asyncio.create_task(self._retire(replica)))

    async def _retire(self, replica: Replica) -> None:
        """Close a retiring replica once the requests it holds have ended (or after ``retire_timeout_s``)."""
        deadline = time.monotonic() + self._retire_timeout
        while replica.retiring and replica.outstanding > 0:  # polled: ``outstanding`` is a plain counter
            if time.monotonic() >= deadline:
                log.warning("executor replica %s closed with %d requests still on it", replica.address,
                            replica.outstanding)
                break
            await asyncio.sleep(0.1)
        if replica.retiring and self.replicas.get(replica.address) is replica:
            await self._remove(replica.address)

    async def _watch_file(self, target: str, path: str, last: tuple[int, int] | None) -> None:
        """Re-read ``path`` when its stamp (mtime, size) moves away from ``last``, the one of the last read."""
        while True:
            await asyncio.sleep(self._file_interval)
            stamp = file_stamp(path)
            if stamp == last:
                continue
            last = stamp
            found = read_addresses(path)
            if found is None:
                log.warning("cannot read executor addresses from %s; keeping %d", path, len(self._found[target]))
                continue
            self._found[target] = found
            self._sync()

    async def _watch_dns(self, targets: list[str]) -> None:
        while True:
            await asyncio.sleep(self._dns_interval)
            await self._resolve(targets)

    # --- health and load --------------------------------------------------------------------------

    async def _watch_health(self, replica: Replica) -> None:
        """Follow the executor's health stream; NOT_SERVING (draining, Triton down) stops new work at once."""
        stub = health_pb2_grpc.HealthStub(replica.channel)
        backoff = 0.2
        while True:
            try:
                async for resp in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    serving = resp.status == health_pb2.HealthCheckResponse.SERVING
                    if serving != replica.serving:
                        log.info("executor %s is %s", replica.address, "SERVING" if serving else "NOT SERVING")
                        if serving:
                            replica.recovered()
                            if replica.link is not None and self.policy == "cache_aware":
                                replica.link.connect()  # its block reports (a snapshot first) start now
                        self.index.forget_guesses(replica.address)  # a restarted executor's cache is empty
                    replica.serving = serving
                    backoff = 0.2
                    self._gauges()
            except grpc.aio.AioRpcError:
                pass
            if replica.serving:
                log.warning("executor %s: health stream lost", replica.address)
            replica.serving = False
            self._gauges()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _poll_status(self, replica: Replica) -> None:
        while True:
            if replica.serving:
                try:
                    status = await replica.stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=2.0)
                    replica.reported_active = status.active_requests
                    replica.models = set(status.ready_models)
                    replica.states = {m.name: m.state for m in status.models}
                    replica.reported = True
                except grpc.aio.AioRpcError:
                    pass
            await asyncio.sleep(self._status_interval)

    def _gauges(self) -> None:
        now = time.monotonic()
        REPLICAS.labels("available").set(sum(r.available(now) for r in self.replicas.values()))
        REPLICAS.labels("unavailable").set(sum(not r.available(now) for r in self.replicas.values()))
        if self.on_change is not None:
            self.on_change()

    async def wait_any_serving(self, timeout: float) -> bool:
        """At start: wait (bounded) until some replica reports SERVING, so readiness means something."""
        deadline = time.monotonic() + timeout
        while not any(r.serving for r in self.replicas.values()):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # --- choice ------------------------------------------------------------------------------------

    def serving_count(self, model: str) -> int:
        """Replicas that can take a request for ``model`` now (as ``pick`` chooses among them)."""
        now = time.monotonic()
        live = [r for r in self.replicas.values() if r.available(now)]
        return sum(model in r.models for r in live) or sum(not r.reported for r in live)

    def prefix(self, token_ids: list[int], *, block_size: int, capacity: int) -> Prefix | None:
        """What ``cache_aware`` routes a prompt by (None: another policy, or a model without a prefix cache)."""
        if self.policy != "cache_aware" or capacity <= 0:
            return None
        return Prefix.of(token_ids, block_size=block_size, capacity=capacity)

    def _choose(self, model: str, serving: list[Replica], prefix: Prefix | None) -> Replica:
        if self.policy == "random":
            ROUTED.labels("random", "random").inc()
            return self._rng.choice(serving)
        if self.policy == "cache_aware" and prefix is not None:
            replica, outcome = choose_cached(serving, model, prefix, self.index, self._rng,
                                             max_imbalance=self.cache_max_imbalance, min_match=self.cache_min_match)
            ROUTED.labels("cache_aware", outcome).inc()
            return replica
        ROUTED.labels("p2c", "p2c").inc()
        return choose(serving, self._rng)

    def pick(self, model: str, *, exclude: set[str] | frozenset[str] = frozenset(), session: str = "",
             prefix: Prefix | None = None) -> Replica:
        """A replica for ``model``: the ``session``'s own while it may take it (``Affinity``), else the ``policy``'s
        choice (and the session pinned to it). ``prefix``: the prompt's blocks, for ``cache_aware``."""
        now = time.monotonic()
        live = [r for r in self.replicas.values() if r.available(now) and r.address not in exclude]
        # Prefer replicas known to serve the model; one whose status is not known yet may serve it too.
        serving = [r for r in live if model in r.models] or [r for r in live if not r.reported]
        if not serving:
            raise Unavailable(f"no executor is available for model {model!r}; retry later")
        if not session:
            return self._choose(model, serving, prefix)
        replica = self.affinity.pinned(model, session, serving, now)
        if replica is None:
            replica = self._choose(model, serving, prefix)
        self.affinity.pin(model, session, replica, now)
        return replica

    def model_state(self, model: str) -> int:
        """``common_pb2.ModelState`` of ``model`` across the live replicas: LOADED on any, else LOADING (this
        router's load, or an executor's), else UNLOADED where some replica has it; UNSPECIFIED: nobody said."""
        now = time.monotonic()
        live = [r for r in self.replicas.values() if r.available(now)]
        if any(model in r.models for r in live):
            return common_pb2.MODEL_STATE_LOADED
        states = {r.states[model] for r in live if model in r.states}
        if model in self._loads or common_pb2.MODEL_STATE_LOADING in states:
            return common_pb2.MODEL_STATE_LOADING
        if states:
            return common_pb2.MODEL_STATE_UNLOADED
        return common_pb2.MODEL_STATE_UNSPECIFIED

    async def ensure_loaded(self, model: str, *, wait_s: float, request_id: str = "") -> None:
        """When no live replica has ``model`` loaded but one can load it: have it loaded (one load per model) and
        wait for it at most ``wait_s`` (``DeadlineExceeded``); a failed load is ``Unavailable``. Otherwise returns at
        once (``pick`` decides)."""
        now = time.monotonic()
        live = [r for r in self.replicas.values() if r.available(now)]
        if any(model in r.models or not r.reported for r in live):
            return
        able = [r for r in live if model in r.states]
        if not able:
            return
        task = self._loads.get(model)
        if task is None:
            replica = min(able, key=Replica.load)
            task = self._loads[model] = asyncio.ensure_future(self._load(replica, model, request_id))
            task.add_done_callback(lambda _t: self._loads.pop(model, None))
        else:
            log.info("progress: request %s waits for model %s to load", request_id, model)
        try:
            async with asyncio.timeout(wait_s):
                await asyncio.shield(task)  # a request that leaves does not cancel the others' load
        except TimeoutError:
            raise DeadlineExceeded(f"model {model!r} was scaled to zero and did not finish loading within the "
                                   f"request's deadline ({wait_s:.1f}s); retry shortly") from None

    async def _load(self, replica: Replica, model: str, request_id: str) -> None:
        started = time.monotonic()
        log.info("progress: model %s is loaded on no executor: asking %s to load it (for request %s)", model,
                 replica.address, request_id)
        call = asyncio.ensure_future(replica.stub.LoadModel(
            executor_pb2.LoadModelRequest(model=model, request_id=request_id), timeout=self._load_timeout_s))
        while not (await asyncio.wait({call}, timeout=2.0))[0]:
            log.info("progress: model %s loading on %s (%.0fs)", model, replica.address, time.monotonic() - started)
        try:
            resp = call.result()
        except grpc.aio.AioRpcError as exc:
            LOADS.labels(model, "failed").inc()
            log.error("model %s failed to load on %s: %s %s", model, replica.address, exc.code().name, exc.details())
            raise Unavailable(f"model {model!r} could not be loaded: {exc.details()}") from None
        took = time.monotonic() - started
        LOADS.labels(model, "loaded").inc()
        COLD_START.labels(model).observe(took)
        replica.models.add(model)
        replica.states[model] = common_pb2.MODEL_STATE_LOADED
        log.info("progress: model %s loaded on %s in %.2fs (cold start; the executor's load took %.2fs)", model,
                 replica.address, took, resp.load_s)
        self._gauges()  # capacity grew: the model's queued requests go in

    @contextlib.asynccontextmanager
    async def open(self, model: str, start: Callable[[Replica], Awaitable[T]], *, request_id: str = "",
                   faults: frozenset[grpc.StatusCode] | None = None, wait_s: float | None = None,
                   session: str = "", prefix: Prefix | None = None) -> AsyncIterator[T]:
        """Start a request for ``model`` on a replica; the block runs while the replica holds it.

        ``start(replica)`` is the part of the work that may be retried, because nothing of it has reached the
        caller: for a stream, opening it and waiting for its first message; for a unary call, the whole call.
        A replica fault meanwhile (``replica_fault``) ejects the replica and starts again once, on another
        replica, within the retry budget; any other failure (the deadline, a bad request, the caller leaving)
        is the request's own and is raised as it is. The replica counts the request as outstanding (the load
        ``pick`` compares) from ``start`` until the block exits. ``faults``: the statuses that say the replica is at
        fault (None: ``REPLICA_FAULTS``; a raw Triton model's own INTERNAL is the request's, not the replica's).
        A model loaded nowhere is loaded first (``ensure_loaded``), waiting at most ``wait_s`` (the seconds left
        to the request's deadline; None: ``load_timeout_s``). ``session``: a session id whose requests keep to one
        replica (``Affinity``); a retry moves it. ``prefix``: the prompt's blocks (``prefix``), recorded in the
        index as held by the replica that took the request.
        """
        await self.ensure_loaded(model, wait_s=self._load_timeout_s if wait_s is None else wait_s,
                                 request_id=request_id)
        replica, opened = await self._start(model, start, request_id, faults or REPLICA_FAULTS, session, prefix)
        try:
            yield opened
        finally:
            replica.outstanding -= 1

    async def _start(self, model: str, start: Callable[[Replica], Awaitable[T]], request_id: str,
                     faults: frozenset[grpc.StatusCode], session: str = "",
                     prefix: Prefix | None = None) -> tuple[Replica, T]:
        tried: set[str] = set()
        self.budget.on_request()
        while True:
            replica = self.pick(model, exclude=tried, session=session, prefix=prefix)
            trace.get_current_span().set_attribute("inferplane.executor", replica.address)
            replica.outstanding += 1
            try:
                opened = await start(replica)
            except BaseException as exc:
                replica.outstanding -= 1
                if not replica_fault(exc, faults):
                    raise
                assert isinstance(exc, grpc.aio.AioRpcError)
                self.failed(replica, exc)
                if tried or not self.budget.try_spend():
                    raise Unavailable(f"executor {replica.address} failed: {exc.code().name}") from exc
                tried.add(replica.address)
                RETRIES.inc()
                log.warning("retrying %s on another replica after %s from %s", request_id, exc.code().name,
                            replica.address)
                continue
            replica.succeeded()
            if prefix is not None:
                self.index.record(model, replica.address, prefix)
            return replica, opened

    def failed(self, replica: Replica, exc: grpc.aio.AioRpcError) -> None:
        """A call to ``replica`` failed in a way that says the replica (not the request) is at fault."""
        backoff = replica.eject(time.monotonic(), self._eject_base, self._eject_max)
        log.warning("executor %s ejected for %.0fs after %s", replica.address, backoff, exc.code().name)
        self._gauges()


def file_stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def read_addresses(path: str) -> set[str] | None:
    """The ``host:port`` lines of an addresses file (blank lines and ``#`` comments skipped); None: unreadable."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    return {line.split("#", 1)[0].strip() for line in text.splitlines()} - {""}


REPLICA_FAULTS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.ABORTED})


def replica_fault(exc: BaseException, faults: frozenset[grpc.StatusCode] = REPLICA_FAULTS) -> bool:
    """Whether a failed call says the replica is unhealthy (so retrying elsewhere may succeed)."""
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in faults
