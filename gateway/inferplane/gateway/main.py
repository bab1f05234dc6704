"""Gateway entry point: settings, uvicorn served programmatically, graceful drain on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import stat
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from inferplane.common import loop
from inferplane.common.logs import setup_logging
from inferplane.common.settings import service_arguments, settings_from_args
from inferplane.common.telemetry import setup_tracing
from inferplane.gateway.app import create_app
from inferplane.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class GatewayServer(uvicorn.Server):
    """``uvicorn.Server`` for the gateway app that reports readiness and its bound port.

    ``serve()`` drains on SIGTERM/SIGINT (stop accepting, let in-flight requests and streams finish within
    ``grace_seconds``, then the lifespan closes the router channel); set ``should_exit`` to stop it from
    code (tests pass ``handle_signals=False`` to leave the process's handlers alone).
    """

    def __init__(self, settings: GatewaySettings, *, ready: asyncio.Event | None = None, handle_signals: bool = True,
                 **app_kwargs: Any) -> None:
        config = uvicorn.Config(create_app(settings, **app_kwargs), host=settings.host, port=settings.port,
                                lifespan="on", log_config=None, access_log=False,
                                timeout_graceful_shutdown=math.ceil(settings.grace_seconds),
                                timeout_keep_alive=math.ceil(settings.keep_alive_s))
        super().__init__(config)
        self.ready = ready or asyncio.Event()
        self.handle_signals = handle_signals
        self.unix_socket = settings.unix_socket
        # the socket file this server bound, (inode, ctime ns): removed at shutdown if still it (an inode number
        # alone is not enough: a file made after this one was unlinked may get the same number)
        self._unix_file: tuple[int, int] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT start the drain. Unlike uvicorn's own, nothing re-raises the signal afterwards,
        so ``serve``'s caller still flushes traces and exits 0."""
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets is None and self.unix_socket:
            sockets = [self.config.bind_socket(), bind_unix_socket(self.unix_socket)]
            self._unix_file = _identity(self.unix_socket)
        await super().startup(sockets)
        if self.started:
            log.info("gateway listening on %s:%d%s", self.config.host, self.port,
                     f" and {self.unix_socket}" if self.unix_socket else "")
            self.ready.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        # the file goes with the server, unless another process has bound the path since (a replacement)
        with contextlib.suppress(FileNotFoundError):
            if self._unix_file is not None and _identity(self.unix_socket) == self._unix_file:
                os.unlink(self.unix_socket)

    @property
    def port(self) -> int:
        """The bound port (after startup)."""
        for server in self.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self.config.port)


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_ctime_ns


def bind_unix_socket(path: str) -> socket.socket:
    """A listening Unix stream socket at ``path`` (one left by a process that died is replaced), for this user
    only."""
    if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def serve(settings: GatewaySettings, *, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``should_exit``); ``ready`` is set once the port accepts connections."""
    provider = setup_tracing("gateway", settings.telemetry)
    try:
        await GatewayServer(settings, ready=ready).serve()
    finally:
        provider.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inferplane-gateway", description="inferplane OpenAI-compatible gateway")
    args = service_arguments(parser, "gateway").parse_args(argv)
    setup_logging("gateway")
    loop.run(serve(settings_from_args(GatewaySettings, args)))
