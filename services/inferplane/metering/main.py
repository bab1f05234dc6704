"""The metering service's entry point: settings, server assembly, run loop."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import grpc

from inferplane.common import loop
from inferplane.common.catalog import load_catalog, read_entries
from inferplane.common.logs import setup_logging
from inferplane.common.server import GrpcServer
from inferplane.common.settings import service_arguments, settings_from_args
from inferplane.common.telemetry import setup_tracing
from inferplane.metering.secret import load_secret
from inferplane.metering.service import MeteringServicer
from inferplane.metering.settings import MeteringSettings
from inferplane.metering.store import MeteringStore
from inferplane.v1 import metering_pb2, metering_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = metering_pb2.DESCRIPTOR.services_by_name["MeteringService"].full_name  # inferplane.v1.MeteringService


def open_store(settings: MeteringSettings) -> MeteringStore:
    """The store for ``settings``, its schema migrated to the newest revision (``alembic upgrade head``)."""
    store = MeteringStore(settings.database_url,
                          load_secret(secret=settings.secret, secret_file=settings.secret_file),
                          reservation_ttl_s=settings.reservation_ttl_s)
    store.migrate()
    return store


def seed_prices(store: MeteringStore, catalog_path: Path | None) -> None:
    """Seed the price table from the catalog's ``prices`` (see ``MeteringStore.seed_prices``)."""
    if catalog_path is None or not Path(catalog_path).exists():
        log.info("no catalog at %s: prices are not seeded", catalog_path)
        return
    catalog = load_catalog(catalog_path)
    seeds = {m.id: m.prices.nanos() for m in catalog.models if m.prices is not None}
    for info in store.seed_prices(seeds):
        log.info("price of %s from the catalog: version %d", info.model, info.price.version)


def seed_catalog(store: MeteringStore, catalog_path: Path | None) -> None:
    """Seed the model catalog from the file (see ``catalog_db.seed``): at the first start every model; later,
    models new in the file and edits of models no admin has changed."""
    if catalog_path is None or not Path(catalog_path).exists():
        log.info("no catalog at %s: the model catalog is not seeded", catalog_path)
        return
    load_catalog(catalog_path)  # the whole file is valid, or nothing of it is taken
    changed = store.seed_catalog(read_entries(catalog_path))
    if changed:
        log.info("catalog models from %s: %s (catalog version %d)", catalog_path, ", ".join(changed),
                 store.catalog_version())


def build_server(settings: MeteringSettings, *, store: MeteringStore | None = None) -> GrpcServer:
    """The metering gRPC server (not started); opens the store from ``settings`` unless one is given, and
    seeds prices from the catalog."""
    store = store if store is not None else open_store(settings)
    seed_prices(store, settings.catalog)
    seed_catalog(store, settings.catalog)
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
        sweeper = asyncio.create_task(sweep_forever(store, settings.sweep_interval_s))
        try:
            await server.serve_until_signal()
        finally:
            sweeper.cancel()
    finally:
        store.close()
        provider.shutdown()


async def sweep_forever(store: MeteringStore, interval_s: float) -> None:
    """Give back expired reservations every ``interval_s`` (admission also sweeps before it reserves)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            swept = await asyncio.to_thread(store.sweep_reservations)
            if swept:
                log.warning("gave back %d expired budget reservations", swept)
        except Exception as exc:  # the database may be down for a while: try again next time
            log.warning("reservation sweep failed: %s", type(exc).__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inferplane-metering", description="inferplane metering service")
    args = service_arguments(parser, "metering").parse_args(argv)
    setup_logging("metering")
    loop.run(run(settings_from_args(MeteringSettings, args)))
    return 0
