"""Tokenizer service entry point: settings, wiring, serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from inferplane.common.logs import setup_logging
from inferplane.common.server import GrpcServer
from inferplane.common.settings import ServerSettings, TelemetrySettings, load_settings
from inferplane.common.telemetry import setup_tracing
from inferplane.tokenization.local import TokenizerRegistry
from inferplane.tokenizer.service import TokenizerServicer
from inferplane.v1 import tokenizer_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "inferplane.v1.TokenizerService"


class TokenizerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERPLANE_TOKENIZER_", env_nested_delimiter="__")

    server: ServerSettings = ServerSettings(port=50052)
    telemetry: TelemetrySettings = TelemetrySettings()
    # The model catalog; each model's ``tokenizer`` folder is loaded at start.
    catalog: Path = Path("config/catalog.yaml")


def build_server(settings: TokenizerSettings, registry: TokenizerRegistry | None = None) -> GrpcServer:
    """The gRPC server with every catalog tokenizer loaded (eagerly: a bad folder fails here)."""
    registry = (registry if registry is not None else TokenizerRegistry.from_catalog_file(settings.catalog)).load_all()
    servicer = TokenizerServicer(registry)
    return GrpcServer(
        settings.server, service_names=[SERVICE_NAME],
        register=lambda s: tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(servicer, s))


async def run(settings: TokenizerSettings) -> None:
    provider = setup_tracing("tokenizer", settings.telemetry)
    server = build_server(settings)
    await server.start()
    try:
        await server.serve_until_signal()
    finally:
        provider.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inferplane-tokenizer", description="inferplane tokenizer service")
    parser.add_argument("--config", type=Path, help="YAML settings file (section 'tokenizer')")
    parser.add_argument("--port", type=int, help="listen port (overrides file and environment)")
    args = parser.parse_args(argv)
    setup_logging("tokenizer")
    settings = load_settings(TokenizerSettings, config_file=args.config, section="tokenizer")
    if args.port is not None:
        settings = settings.model_copy(update={"server": settings.server.model_copy(update={"port": args.port})})
    asyncio.run(run(settings))
