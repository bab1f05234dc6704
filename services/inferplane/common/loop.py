"""The event loop every service runs on: uvloop where it is installed, else asyncio's own.

grpc.aio runs on uvloop (checked: server and client in one loop, 32 concurrent server streams, cancellation,
deadlines, bidi streams; ``docs/router.md``), and costs less CPU per message there; uvicorn's HTTP protocol
uses the loop's transports. A service's ``main`` calls ``run(coro)`` where it called ``asyncio.run(coro)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a uvloop loop when uvloop is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
