"""The router's settings (file section ``router``, environment ``INFERPLANE_ROUTER_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferplane.assets import CATALOG
from inferplane.common.settings import ServerSettings, TelemetrySettings


class RouterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERPLANE_ROUTER_", env_nested_delimiter="__")

    server: ServerSettings = ServerSettings(port=50051)
    telemetry: TelemetrySettings = TelemetrySettings()
    catalog: Path = CATALOG
    tokenizer_addr: str = "127.0.0.1:50052"
    metering_addr: str = "127.0.0.1:50054"
    # Executor endpoints: host:port each, or dns:///name:port (a headless Service: one replica per address).
    executor_addrs: list[str] = ["127.0.0.1:50053"]
    # A failed replica is ejected for eject_base_s, doubling per consecutive failure up to eject_max_s.
    eject_base_s: float = 1.0
    eject_max_s: float = 30.0
    # Retries (before a first token only) may add at most this fraction of requests.
    retry_budget_ratio: float = 0.2
    # ... plus this many retries in a burst (requests queued on a replica that just died).
    retry_budget_burst: float = 50.0
    # How generations reach executors: "channel" (one long-lived ExecutorService.Channel per executor, every
    # request a sequence on it, one frame per model step) or "generate" (one Generate call per request: the
    # per-request baseline, for comparison in benchmarks).
    executor_transport: Literal["channel", "generate"] = "channel"
    # A channel with live sequences that sends nothing (no frame, no heartbeat: the executor sends one a second)
    # for this long is treated as broken: its sequences without a token are retried elsewhere, the others fail.
    channel_silence_s: float = 20.0
    # Upper bound of one request when the caller sets no deadline.
    request_timeout_s: float = 600.0
    # Where streamed token ids become text: "local" (in the router, with inferplane.tokenization's code and
    # the catalog's files, as the tokenizer service: no extra hop per message) or "remote" (its DecodeStream).
    detokenize: Literal["local", "remote"] = "local"
    # Where prompts become token ids: "local" (in the router, the same library and files as the tokenizer
    # service: no round trip before the executor is called) or "remote" (the tokenizer service's Encode).
    tokenize: Literal["local", "remote"] = "local"
    # Seconds a verified key stays cached (revocation takes effect within this time).
    key_cache_ttl_s: float = 30.0
    # while metering is unreachable, a key verified within this many seconds keeps working (0: none does)
    key_stale_ttl_s: float = 600.0
    # Rate limits shared by several routers through Redis (redis://host:6379/0); None: in this process.
    redis_url: str | None = None
    # When Redis cannot be reached: "local" (each router enforces the limits alone), "open" or "closed".
    ratelimit_on_redis_error: Literal["local", "open", "closed"] = "local"
    # The durable outbox of usage records metering has not acknowledged (replayed at start).
    outbox_path: Path = Path(".inferplane/router-outbox.db")
    # Seconds the price table from metering is kept before it is asked again.
    price_ttl_s: float = 10.0
    # Seconds between polls of metering's catalog version (a change is picked up within this time, without a
    # restart: docs/catalog.md); 0: the catalog file is the catalog, never polled.
    catalog_poll_s: float = 2.0
    # Fair queue (docs/router.md): within a service tier, the waiting request of the tenant served the fewest tokens
    # goes first (VTC); false: arrival order.
    fair_queue: bool = True
    # Session affinity (docs/router.md): sessions remembered (LRU), seconds a session's pin outlives its last request,
    # and how many requests more than the least-loaded replica its replica may hold before the session moves.
    affinity_max_sessions: int = Field(default=10_000, ge=0)
    affinity_idle_s: float = Field(default=300.0, gt=0)
    affinity_max_imbalance: int = Field(default=8, ge=0)
    # How a replica is chosen (docs/router.md): "cache_aware" (the replica that holds the longest run of the
    # prompt's leading prefix-cache blocks; power of two choices when the best match covers less than
    # cache_min_match of the prompt's blocks, or its replica holds more than cache_max_imbalance requests above the
    # least-loaded one), "p2c" (power of two choices on outstanding requests) or "random".
    routing_policy: Literal["cache_aware", "p2c", "random"] = "cache_aware"
    cache_max_imbalance: int = Field(default=8, ge=0)
    cache_min_match: float = Field(default=0.1, ge=0, le=1)

    def channel_silence(self) -> float | None:
        """The ``ReplicaSet``'s ``channel_silence_s``: None when requests use per-request ``Generate`` calls."""
        return self.channel_silence_s if self.executor_transport == "channel" else None
