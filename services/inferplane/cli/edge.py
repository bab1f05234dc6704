"""The router with the REST edge in its process (``inferplane serve router-gateway``; ``inferplane up --edge
in-router``): one event loop serves the router's gRPC API (Envoy routes ``RouterService`` to it) and the gateway's
app (uvicorn; Envoy routes ``/v1`` to it), and the app calls the router's servicer in process
(``inferplane.cli.inprocess``): what vLLM, TGI and SGLang do, no protobuf message per token between processes.

Settings are the two services' own (the file's ``router`` and ``gateway`` sections); the gateway's
``router_addr`` is not used. Spans keep their service: the global tracer provider is the router's, the app's
SERVER spans go through a second provider named ``gateway``. One Prometheus registry serves both on either
metrics port. SIGTERM/SIGINT drain both: the router's health turns NOT_SERVING, uvicorn stops accepting and
lets in-flight requests and streams finish (``grace_seconds``) while the gRPC server drains its own calls, then
the router closes (outbox, channels).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from inferplane.cli.inprocess import InProcessRouter
from inferplane.common import loop
from inferplane.common.logs import setup_logging
from inferplane.common.settings import load_settings, service_arguments, settings_from_args
from inferplane.common.telemetry import setup_tracing, tracer_provider
from inferplane.gateway.main import GatewayServer
from inferplane.gateway.settings import GatewaySettings
from inferplane.router.main import Router
from inferplane.router.settings import RouterSettings

log = logging.getLogger(__name__)


class RouterWithEdge:
    """A started ``Router`` and the gateway app serving it in process."""

    def __init__(self, router_settings: RouterSettings, gateway_settings: GatewaySettings) -> None:
        self.router = Router(router_settings)
        self.serving = False
        self.gateway_provider = tracer_provider("gateway", gateway_settings.telemetry)
        api = InProcessRouter(self.router.servicer, timeout_s=gateway_settings.request_timeout_s,
                              serving=lambda: self.serving, kserve=self.router.kserve)
        self.gateway = GatewayServer(gateway_settings, handle_signals=False, router=api,
                                     tracer_provider=self.gateway_provider)
        self._gateway_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.router.start()
        self.serving = True
        self._gateway_task = asyncio.create_task(self.gateway.serve())
        ready = asyncio.create_task(self.gateway.ready.wait())
        await asyncio.wait((ready, self._gateway_task), return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            await self._gateway_task  # raises why it stopped (a port in use: uvicorn exits)
            raise RuntimeError("the gateway stopped while starting")

    async def stop(self) -> None:
        """Drain both, then close the router (its engine, outbox, channels)."""
        self.serving = False
        self.gateway.should_exit = True  # stop accepting; in-flight requests get the gateway's grace
        await self.router.server.stop()  # health NOT_SERVING, gRPC calls get the router's grace
        if self._gateway_task is not None:
            await self._gateway_task
        await self.router.close()
        self.gateway_provider.shutdown()

    @property
    def gateway_port(self) -> int:
        return self.gateway.port


async def run(router_settings: RouterSettings, gateway_settings: GatewaySettings) -> None:
    provider = setup_tracing("router", router_settings.telemetry)
    both = RouterWithEdge(router_settings, gateway_settings)
    try:
        await both.start()
        log.info("router and REST edge in one process: gRPC :%d, HTTP :%d", both.router.server.port,
                 both.gateway_port)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received: draining")
        await both.stop()
    finally:
        provider.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inferplane-router-gateway",
                                     description="inferplane router with the REST edge in its process")
    service_arguments(parser, "router")
    parser.add_argument("--gateway-section", default="gateway", help="the file's section of the gateway's settings")
    parser.add_argument("--gateway-port", type=int, default=None, help="the REST edge's listen port")
    args = parser.parse_args(argv)
    setup_logging("router")
    gateway_overrides = {"port": args.gateway_port} if args.gateway_port is not None else {}
    gateway = load_settings(GatewaySettings, config_file=args.config, section=args.gateway_section,
                            **gateway_overrides)
    loop.run(run(settings_from_args(RouterSettings, args), gateway))
