"""Router service entry point: settings, wiring, serve."""

from __future__ import annotations

import argparse
import logging

import grpc
from tritonclient.grpc import service_pb2_grpc

from inferplane.common import loop
from inferplane.common.catalog import Catalog, load_catalog
from inferplane.common.catalog_watch import CatalogWatcher
from inferplane.common.logs import setup_logging
from inferplane.common.server import GrpcServer, client_channel
from inferplane.common.settings import service_arguments, settings_from_args
from inferplane.common.telemetry import setup_tracing
from inferplane.router.admission import Admission, PriceBook
from inferplane.router.auth import KeyVerifier
from inferplane.router.clients import MeteringClient
from inferplane.router.engine import GenerationEngine
from inferplane.router.kserve import SERVICE as KSERVE_SERVICE
from inferplane.router.kserve import KServeServicer
from inferplane.router.outbox import UsageOutbox, batch_sender
from inferplane.router.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter
from inferplane.router.replicas import Affinity, ReplicaSet
from inferplane.router.service import RouterServicer
from inferplane.router.settings import RouterSettings
from inferplane.tokenization import GrpcTokenizer, LocalTokenizer, SplitTokenizer, Tokenizer, TokenizerRegistry
from inferplane.v1 import router_pb2_grpc

log = logging.getLogger(__name__)


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


def _local_registries(tokenizer: Tokenizer) -> list[TokenizerRegistry]:
    """The in-process tokenizer registries behind ``tokenizer`` (the remote tokenizer service has its own)."""
    parts = tokenizer.parts if isinstance(tokenizer, SplitTokenizer) else (tokenizer,)
    return [p.registry for p in parts if isinstance(p, LocalTokenizer)]


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
                                   retry_ratio=settings.retry_budget_ratio, retry_burst=settings.retry_budget_burst,
                                   channel_silence_s=settings.channel_silence(),
                                   affinity=Affinity(max_sessions=settings.affinity_max_sessions,
                                                     idle_s=settings.affinity_idle_s,
                                                     max_imbalance=settings.affinity_max_imbalance),
                                   policy=settings.routing_policy, cache_max_imbalance=settings.cache_max_imbalance,
                                   cache_min_match=settings.cache_min_match)
        metering = MeteringClient(metering_channel)
        self.limiter: RateLimiter = (RedisRateLimiter(settings.redis_url, on_error=settings.ratelimit_on_redis_error)
                                     if settings.redis_url else LocalRateLimiter())
        prices = PriceBook(metering, catalog, ttl_s=settings.price_ttl_s)
        admission = Admission(metering, self.limiter, prices)
        self.outbox = UsageOutbox(settings.outbox_path, batch_sender(metering))
        self.engine = GenerationEngine(catalog=catalog, tokenizer=self.tokenizer,
                                       executors=self.replicas, metering=metering,
                                       request_timeout_s=settings.request_timeout_s,
                                       admission=admission, outbox=self.outbox, fair_queue=settings.fair_queue)
        # served over gRPC, and called in process by a REST edge in this process (``inferplane.cli.edge``)
        keys = KeyVerifier(metering, ttl=settings.key_cache_ttl_s, stale_ttl=settings.key_stale_ttl_s)
        self.servicer = RouterServicer(self.engine, keys)
        # the KServe v2 protocol for raw Triton models (``tritonclient``), on the same port
        self.kserve = KServeServicer(self.engine, keys)
        self.catalog_watch = CatalogWatcher(metering.list_catalog, settings.catalog.parent, self._apply_catalog,
                                            interval_s=settings.catalog_poll_s)
        self._prices = prices
        self.server = GrpcServer(
            settings.server, service_names=["inferplane.v1.RouterService", KSERVE_SERVICE], register=self._register)

    def _register(self, server: grpc.aio.Server) -> None:
        router_pb2_grpc.add_RouterServiceServicer_to_server(self.servicer, server)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.kserve, server)

    def _apply_catalog(self, catalog: Catalog) -> None:
        """Metering's catalog changed: every part of the router that reads the catalog takes the new one."""
        self.engine.swap_catalog(catalog)
        for registry in _local_registries(self.tokenizer):
            registry.set_paths({m.id: m.tokenizer for m in catalog.models})
        self._prices.reseed(catalog)

    async def start(self) -> int:
        self.outbox.start()  # replays what a previous run left first
        if self.settings.catalog_poll_s > 0:
            try:  # start with metering's catalog when it answers (else the file's, until a poll gets through)
                await self.catalog_watch.poll_once()
            except grpc.aio.AioRpcError as exc:
                log.warning("catalog not read from metering at start (%s): the file's is in force",
                            exc.code().name)
            self.catalog_watch.start()
        await self.replicas.start()
        if not await self.replicas.wait_any_serving(timeout=10.0):
            log.warning("no executor replica is serving yet; requests get UNAVAILABLE until one is")
        return await self.server.start()

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)
        await self.close()

    async def close(self) -> None:
        await self.catalog_watch.stop()
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
    args = service_arguments(parser, "router").parse_args(argv)
    setup_logging("router")
    loop.run(run(settings_from_args(RouterSettings, args)))
