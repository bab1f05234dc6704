"""Fire-and-forget tasks that must run to their end: asyncio keeps only weak references to tasks, so a task
nobody holds can be collected mid-flight. ``spawn`` holds it until it is done."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

_RUNNING: set[asyncio.Future[Any]] = set()


def keep(task: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """Hold ``task`` until it is done."""
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    return task


def spawn(aw: Awaitable[Any]) -> asyncio.Future[Any]:
    """Run ``aw`` in the background, held until it is done."""
    return keep(asyncio.ensure_future(aw))
