"""The metering service's entry point: settings, server assembly, run loop."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import grpc
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferplane.v1 import metering_pb2, metering_pb2_grpc
from services.common.server import GrpcServer
from services.common.settings import ServerSettings, TelemetrySettings, load_settings
from services.common.telemetry import setup_tracing
from services.metering.secret import load_secret
from services.metering.service import MeteringServicer
from services.metering.store import MeteringStore

log = logging.getLogger(__name__)

SERVICE_NAME = metering_pb2.DESCRIPTOR.services_by_name["MeteringService"].full_name  # inferplane.v1.MeteringService


class MeteringSettings(BaseSettings):
    """Everything the metering service (and the metering CLI) needs."""

    model_config = SettingsConfigDict(env_prefix="INFERPLANE_METERING_", env_nested_delimiter="__")

    server: ServerSettings = ServerSettings(port=50054)
    telemetry: TelemetrySettings = TelemetrySettings()
    # SQLAlchemy URL: SQLite file locally, PostgreSQL in production.
    database_url: str = "sqlite:///.inferplane/metering.db"
    # HMAC secret for key digests; when unset, read from (or created at) ``secret_file``.
    secret: SecretStr | None = None
    secret_file: Path = Path(".inferplane/metering-secret")


def open_store(settings: MeteringSettings) -> MeteringStore:
    """The store for ``settings``, its tables created (until migrations arrive)."""
    store = MeteringStore(settings.database_url,
                          load_secret(secret=settings.secret, secret_file=settings.secret_file))
    store.create_tables()
    return store


def build_server(settings: MeteringSettings, *, store: MeteringStore | None = None) -> GrpcServer:
    """The metering gRPC server (not started); opens the store from ``settings`` unless one is given."""
    store = store if store is not None else open_store(settings)
    servicer = MeteringServicer(store)

    def register(server: grpc.aio.Server) -> None:
        metering_pb2_grpc.add_MeteringServiceServicer_to_server(servicer, server)

    async def ready() -> bool:
        return await asyncio.to_thread(store.ping)

    return GrpcServer(settings.server, service_names=[SERVICE_NAME], register=register, readiness=ready)


async def run(settings: MeteringSettings) -> None:
    """Serve until SIGTERM/SIGINT, then drain."""
    provider = setup_tracing("metering", settings.telemetry)
    store = open_store(settings)
    try:
        server = build_server(settings, store=store)
        await server.start()
        await server.serve_until_signal()
    finally:
        store.close()
        provider.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inferplane-metering", description="inferplane metering service")
    parser.add_argument("--config", type=Path, default=None, help="YAML file; its 'metering' section is read")
    parser.add_argument("--port", type=int, default=None, help="listen port (overrides the settings)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(MeteringSettings, config_file=args.config, section="metering")
    if args.port is not None:
        settings.server = settings.server.model_copy(update={"port": args.port})
    asyncio.run(run(settings))
    return 0
