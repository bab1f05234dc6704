"""A service's view of metering's model catalog (the router's, the tokenizer service's): polled by version,
swapped in whole when it moved.

Every ``interval_s`` the watcher asks metering ``ListCatalog(if_newer_than=<the version it has>)``: one cheap
read while nothing changes. When the version moved, it builds a new ``Catalog`` from metering's entries (paths
resolved against the service's own catalog file's folder, as the file's are) and hands it to ``apply``, which
swaps it in (the router: ``GenerationEngine.swap_catalog``; a request in flight keeps the ``CatalogModel`` it
started with, a new request sees the new catalog). While metering cannot be reached the last catalog stays in
force; a catalog metering never seeded (version 0) leaves the file's in force.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import grpc
from pydantic import ValidationError

from inferplane.common.catalog import Catalog, catalog_from_data
from inferplane.v1 import metering_pb2, metering_pb2_grpc

log = logging.getLogger(__name__)


def catalog_from_pb(models: Iterable[metering_pb2.CatalogModel], base: Path) -> Catalog:
    """A ``Catalog`` from metering's entries; ``ValueError`` (or pydantic's) when one is not a valid entry."""
    entries = [{**json.loads(m.spec_json or "{}"), "id": m.id, "triton_model": m.versions[m.version],
                "versions": dict(m.versions), "version": m.version} for m in models]
    return catalog_from_data({"models": entries}, base)


Fetch = Callable[..., Awaitable[metering_pb2.ListCatalogResponse]]


def list_catalog_of(channel: grpc.aio.Channel) -> Fetch:
    """``fetch`` for a ``CatalogWatcher`` over a channel to metering."""
    stub = metering_pb2_grpc.MeteringServiceStub(channel)

    async def fetch(*, if_newer_than: int, timeout: float) -> metering_pb2.ListCatalogResponse:
        return await stub.ListCatalog(metering_pb2.ListCatalogRequest(if_newer_than=if_newer_than), timeout=timeout)

    return fetch


class CatalogWatcher:
    """``fetch(if_newer_than=, timeout=)``: metering's ListCatalog (``MeteringClient.list_catalog`` or
    ``list_catalog_of(channel)``)."""

    def __init__(self, fetch: Fetch, base: Path, apply: Callable[[Catalog], None], *,
                 interval_s: float = 2.0, timeout_s: float = 2.0) -> None:
        self._fetch = fetch
        self._base = base
        self._apply = apply
        self.interval_s = interval_s
        self._timeout_s = timeout_s
        self.version = 0  # the catalog version in force (0: the file's)
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def poll_once(self) -> bool:
        """Ask metering once; True when a new catalog was applied. Raises ``grpc.aio.AioRpcError``."""
        resp = await self._fetch(if_newer_than=self.version, timeout=self._timeout_s)
        if resp.unchanged or resp.version <= self.version:
            return False
        try:
            catalog = catalog_from_pb(resp.models, self._base)
        except (ValueError, KeyError, ValidationError) as exc:
            # a bad entry must not take the good ones down: keep the catalog in force, skip this version
            log.error("catalog version %d from metering not applied: %s", resp.version, exc)
            self.version = resp.version
            return False
        before = self.version
        self._apply(catalog)
        self.version = resp.version
        log.info("catalog version %d (was %d): %s", resp.version, before, ", ".join(m.id for m in catalog.models))
        return True

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
                if self._failing:
                    log.info("catalog polling from metering works again")
                self._failing = False
            except grpc.aio.AioRpcError as exc:
                if not self._failing:  # once per outage, not every poll
                    log.warning("catalog not polled from metering (%s); keeping version %d", exc.code().name,
                                self.version)
                self._failing = True
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self.interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self.run(), name="catalog-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
