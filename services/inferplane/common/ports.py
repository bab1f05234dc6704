"""Picking a free local port for a child process that must be told its port (Envoy, Triton, a stack).

A port the kernel hands out for ``bind(0)`` comes from the ephemeral range, the same range it uses for the
source ports of outgoing connections: between picking it and the child binding it, any connection on the
machine may take it ("Address already in use", seen in CI). Ports are picked below that range instead, at
random, and checked free.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20000  # above the well-known services of these machines (PostgreSQL, Redis, NATS, ...)


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that is free now and outside the kernel's ephemeral range (when there is room)."""
    top = _ephemeral_start() - 1
    for _ in range(200):
        port = random.randint(LOWEST, top) if top > LOWEST else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free port on {host}")
