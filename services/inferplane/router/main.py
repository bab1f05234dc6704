"""Router service entry point: settings, wiring, serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Literal

import grpc
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferplane.common.catalog import Catalog, load_catalog
from inferplane.common.logs import setup_logging
from inferplane.common.server import GrpcServer, client_channel
from inferplane.common.settings import ServerSettings, TelemetrySettings, load_settings
from inferplane.common.telemetry import setup_tracing
from inferplane.router.admission import Admission, PriceBook
from inferplane.router.auth import KeyVerifier
from inferplane.router.clients import MeteringClient
from inferplane.router.engine import GenerationEngine
from inferplane.router.outbox import UsageOutbox, batch_sender
from inferplane.router.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter
from inferplane.router.replicas import ReplicaSet
from inferplane.router.service import RouterServicer
from inferplane.tokenization import GrpcTokenizer, LocalTokenizer, SplitTokenizer, Tokenizer, TokenizerRegistry
from inferplane.v1 import router_pb2_grpc

log = logging.getLogger(__name__)


class RouterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERPLANE_ROUTER_", env_nested_delimiter="__")

    server: ServerSettings = ServerSettings(port=50051)
    telemetry: TelemetrySettings = TelemetrySettings()
    catalog: Path = Path("config/catalog.yaml")
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


def build_tokenizer(settings: RouterSettings, catalog: Catalog) -> tuple[Tokenizer, grpc.aio.Channel | None]:
    """The router's one ``Tokenizer``: ``tokenize`` says where prompts are encoded, ``detokenize`` where streamed
    ids become text. The channel to the tokenizer service is opened only when one of them is "remote"."""
    wanted = {settings.tokenize, settings.detokenize}
    channel = client_channel(settings.tokenizer_addr) if "remote" in wanted else None
    made: dict[str, Tokenizer] = {}
    if channel is not None:
        made["remote"] = GrpcTokenizer(channel)
    if "local" in wanted:
        made["local"] = LocalTokenizer(TokenizerRegistry.from_catalog(catalog))  # each model loads on first use
    encoder, decoder = made[settings.tokenize], made[settings.detokenize]
    return (encoder if encoder is decoder else SplitTokenizer(encoder=encoder, decoder=decoder)), channel


class Router:
    """The router's server and its outbound channels, started and stopped together."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        catalog = load_catalog(settings.catalog)
        self.tokenizer, tokenizer_channel = build_tokenizer(settings, catalog)
        metering_channel = client_channel(settings.metering_addr)
        self._channels = [metering_channel, *([tokenizer_channel] if tokenizer_channel is not None else [])]
        self.replicas = ReplicaSet(settings.executor_addrs, channel_factory=client_channel,
                                   eject_base_s=settings.eject_base_s, eject_max_s=settings.eject_max_s,
                                   retry_ratio=settings.retry_budget_ratio,
                                   retry_burst=settings.retry_budget_burst)
        metering = MeteringClient(metering_channel)
        self.limiter: RateLimiter = (RedisRateLimiter(settings.redis_url, on_error=settings.ratelimit_on_redis_error)
                                     if settings.redis_url else LocalRateLimiter())
        admission = Admission(metering, self.limiter, PriceBook(metering, catalog, ttl_s=settings.price_ttl_s))
        self.outbox = UsageOutbox(settings.outbox_path, batch_sender(metering))
        self.engine = GenerationEngine(catalog=catalog, tokenizer=self.tokenizer,
                                       executors=self.replicas, metering=metering,
                                       request_timeout_s=settings.request_timeout_s,
                                       admission=admission, outbox=self.outbox)
        servicer = RouterServicer(self.engine, KeyVerifier(metering, ttl=settings.key_cache_ttl_s,
                                                                   stale_ttl=settings.key_stale_ttl_s))
        self.server = GrpcServer(
            settings.server, service_names=["inferplane.v1.RouterService"],
            register=lambda s: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, s))

    async def start(self) -> int:
        self.outbox.start()  # replays what a previous run left first
        await self.replicas.start()
        if not await self.replicas.wait_any_serving(timeout=10.0):
            log.warning("no executor replica is serving yet; requests get UNAVAILABLE until one is")
        return await self.server.start()

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)
        await self.close()

    async def close(self) -> None:
        await self.engine.drain()
        await self.outbox.stop()  # sends what it can; the rest stays in the file for the next start
        if isinstance(self.limiter, RedisRateLimiter):
            await self.limiter.close()
        await self.replicas.close()
        for channel in self._channels:
            await channel.close(None)


async def run(settings: RouterSettings) -> None:
    provider = setup_tracing("router", settings.telemetry)
    router = Router(settings)
    await router.start()
    try:
        await router.server.serve_until_signal(router.close)
    finally:
        provider.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inferplane-router", description="inferplane router service")
    parser.add_argument("--config", type=Path, help="YAML settings file (section 'router')")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    setup_logging("router")
    overrides = {}
    settings = load_settings(RouterSettings, config_file=args.config, section="router")
    if args.port is not None:
        overrides["server"] = settings.server.model_copy(update={"port": args.port})
        settings = settings.model_copy(update=overrides)
    asyncio.run(run(settings))
