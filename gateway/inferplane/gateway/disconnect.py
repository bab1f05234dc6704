"""A caller that leaves cancels its work: the one helper the REST routes share (embeddings, KServe, Anthropic's
messages and count_tokens, the Responses API). Chat and text completions run their own ASGI path and watch
``receive`` in ``generation._until_gone``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from inferplane.gateway.errors import CLIENT_CLOSED_REQUEST, GatewayError

T = TypeVar("T")


def client_gone() -> GatewayError:
    return GatewayError(CLIENT_CLOSED_REQUEST, "The client closed the connection.", code="request_cancelled")


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; a caller that disconnects first gets it cancelled (and with it the router call it makes)
    and ``client_gone`` raised. ``work``'s own result or exception otherwise."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))
    if task.cancelled():
        raise client_gone()
    return task.result()
