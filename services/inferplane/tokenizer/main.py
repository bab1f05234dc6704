"""Tokenizer service entry point: settings, wiring, serve."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Awaitable, Callable

from inferplane.common import loop
from inferplane.common.catalog_watch import CatalogWatcher, list_catalog_of
from inferplane.common.logs import setup_logging
from inferplane.common.server import GrpcServer, client_channel
from inferplane.common.settings import service_arguments, settings_from_args
from inferplane.common.telemetry import setup_tracing
from inferplane.tokenization.local import TokenizerRegistry
from inferplane.tokenizer.service import TokenizerServicer
from inferplane.tokenizer.settings import TokenizerSettings
from inferplane.v1 import tokenizer_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "inferplane.v1.TokenizerService"


def build_server(settings: TokenizerSettings, registry: TokenizerRegistry | None = None,
                 refresh: Callable[[], Awaitable[bool]] | None = None) -> GrpcServer:
    """The gRPC server with every catalog tokenizer loaded (eagerly: a bad folder fails here); ``refresh``: poll
    metering's catalog now (an unknown model may have just been added there)."""
    registry = (registry if registry is not None else TokenizerRegistry.from_catalog_file(settings.catalog)).load_all()
    servicer = TokenizerServicer(registry, refresh)
    return GrpcServer(
        settings.server, service_names=[SERVICE_NAME],
        register=lambda s: tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(servicer, s))


async def run(settings: TokenizerSettings) -> None:
    provider = setup_tracing("tokenizer", settings.telemetry)
    registry = TokenizerRegistry.from_catalog_file(settings.catalog)
    channel = client_channel(settings.metering_addr) if settings.metering_addr and settings.catalog_poll_s > 0 \
        else None
    watch = None
    if channel is not None:  # models registered at run time get their tokenizer here too (loaded on first use)
        watch = CatalogWatcher(list_catalog_of(channel), settings.catalog.parent,
                               lambda catalog: registry.set_paths({m.id: m.tokenizer for m in catalog.models}),
                               interval_s=settings.catalog_poll_s)
    server = build_server(settings, registry, watch.poll_once if watch is not None else None)
    await server.start()
    if watch is not None:
        watch.start()
    try:
        await server.serve_until_signal()
    finally:
        if watch is not None:
            await watch.stop()
        if channel is not None:
            await channel.close(None)
        provider.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inferplane-tokenizer", description="inferplane tokenizer service")
    args = service_arguments(parser, "tokenizer").parse_args(argv)
    setup_logging("tokenizer")
    loop.run(run(settings_from_args(TokenizerSettings, args)))
