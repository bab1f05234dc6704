"""``unless_gone``, the one helper the REST routes (embeddings, KServe, Anthropic's messages, the Responses API)
share to cancel their work when the caller leaves: a Starlette request over an ASGI ``receive`` the test feeds."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request
from starlette.types import Message

from inferplane.gateway.disconnect import unless_gone
from inferplane.gateway.errors import CLIENT_CLOSED_REQUEST, GatewayError


def request_over(messages: asyncio.Queue[Message]) -> Request:
    async def receive() -> Message:
        return await messages.get()

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


async def test_the_work_s_result_when_the_caller_stays() -> None:
    messages: asyncio.Queue[Message] = asyncio.Queue()

    async def work() -> int:
        await asyncio.sleep(0)
        return 7

    assert await unless_gone(request_over(messages), work()) == 7


async def test_a_disconnect_cancels_the_work_and_answers_499() -> None:
    messages: asyncio.Queue[Message] = asyncio.Queue()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> int:
        started.set()
        try:
            await asyncio.Event().wait()  # a router call that never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    async def leave() -> None:
        await started.wait()
        await messages.put({"type": "http.request", "body": b"", "more_body": False})  # not a disconnect: ignored
        await messages.put({"type": "http.disconnect"})

    leaving = asyncio.ensure_future(leave())
    with pytest.raises(GatewayError) as gone:
        await asyncio.wait_for(unless_gone(request_over(messages), work()), timeout=5)
    await leaving
    assert cancelled.is_set(), "the work saw its cancellation"
    assert (gone.value.status, gone.value.code) == (CLIENT_CLOSED_REQUEST, "request_cancelled")


async def test_the_work_s_own_error_passes_through() -> None:
    messages: asyncio.Queue[Message] = asyncio.Queue()

    async def work() -> int:
        raise GatewayError(404, "no such model")

    with pytest.raises(GatewayError) as err:
        await unless_gone(request_over(messages), work())
    assert err.value.status == 404


async def test_the_watcher_does_not_outlive_the_work() -> None:
    messages: asyncio.Queue[Message] = asyncio.Queue()
    before = asyncio.all_tasks()

    async def work() -> str:
        return "done"

    await unless_gone(request_over(messages), work())
    await asyncio.sleep(0)  # the cancelled watcher runs its cancellation
    assert asyncio.all_tasks() == before
