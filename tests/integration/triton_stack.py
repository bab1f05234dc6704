"""What the Triton-backed integration tests share: a Triton server started on a rendered model repository, its
metrics page, an executor's settings on a real Triton, and the ``stack`` fixture (executor + router + gateway app on
a seeded metering) with ``eventually`` to wait on it. Not a test module: the tests import what they use (a fixture
imported into a module is that module's fixture)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest_asyncio

from inferplane.assets import CATALOG
from inferplane.cli.launcher import free_port
from inferplane.common.settings import ServerSettings
from inferplane.executor.main import Executor
from inferplane.executor.settings import ExecutorSettings, TritonSettings
from inferplane.executor.triton_process import TritonProcess, prepare_backend_dir
from inferplane.gateway.app import create_app
from inferplane.gateway.settings import GatewaySettings
from inferplane.metering.main import seed_catalog
from inferplane.router.main import Router
from inferplane.router.settings import RouterSettings
from tests.integration.test_admission import Metering

CATALOG_POLL_S = 0.2


@contextmanager
def running_triton(work: Path, *, ready_timeout_s: float = 180) -> Iterator[TritonProcess]:
    """A Triton server on the model repository ``work/repo`` (rendered by the caller), ready, stopped after."""
    server = TritonProcess(work / "repo", backend_dir=prepare_backend_dir(work / "cache"), log_path=work / "log")
    server.start()
    try:
        server.wait_ready(timeout=ready_timeout_s)
        yield server
    finally:
        server.stop()


def metrics_page(server: TritonProcess) -> str:
    with urllib.request.urlopen(f"http://{server.host}:{server.metrics_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def executor_settings(work_dir: Path) -> ExecutorSettings:
    """An executor of the shipped catalog on a Triton of its own (fresh ports, quick stop)."""
    return ExecutorSettings(
        server=ServerSettings(port=0, grace_seconds=1), catalog=CATALOG,
        triton=TritonSettings(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                              work_dir=work_dir, exit_timeout_s=1, ready_timeout_s=180))


@pytest_asyncio.fixture
async def stack(metering: Metering, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Router]]:
    """The gateway app (an httpx client on it) over a router polling ``metering``'s seeded catalog every
    ``CATALOG_POLL_S`` and one executor on a real Triton. Needs the ``metering`` fixture in the using module."""
    seed_catalog(metering.store, CATALOG)
    executor = Executor(executor_settings(tmp_path / "executor"))
    await executor.start()
    metering_addr = f"127.0.0.1:{metering.server.port}"
    router = Router(RouterSettings(server=ServerSettings(port=0, grace_seconds=0), metering_addr=metering_addr,
                                   executor_addrs=[f"127.0.0.1:{executor.server.port}"],
                                   outbox_path=tmp_path / "outbox.db", request_timeout_s=60,
                                   catalog_poll_s=CATALOG_POLL_S))
    await router.start()  # metering's catalog, the executor's replica, the server
    app = create_app(GatewaySettings(router_addr=f"127.0.0.1:{router.server.port}", metering_addr=metering_addr,
                                     request_timeout_s=60))
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=60) as client:
            yield client, router
    finally:
        await router.stop(0)
        await executor.stop(0)


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < within_s, f"{what}: not within {within_s}s"
        await asyncio.sleep(0.1)
