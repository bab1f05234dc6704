"""Explicit model control on a real Triton: LoadModel / UnloadModel, each model's state in GetStatus (as Triton's own
repository index says), scale to zero after ``idle_unload_s``, and a request to an unloaded model loading it first
(on ``Generate`` and on the router's channel, whose step stream must not hold the unload)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc.aio as triton_aio
import yaml

from inferplane.assets import CATALOG, TINY_LLAMA
from inferplane.cli.launcher import free_port
from inferplane.common.settings import ServerSettings
from inferplane.executor.main import Executor
from inferplane.executor.settings import ExecutorSettings, TritonSettings
from inferplane.router.channel import ExecutorChannel
from inferplane.tokenization.bundle import TokenizerBundle
from inferplane.v1 import common_pb2, executor_pb2, executor_pb2_grpc

pytestmark = pytest.mark.triton
IDLE_S = 3.0


def tiny_catalog(folder: Path, idle_unload_s: float) -> Path:
    """The shipped catalog's tiny-llama alone, with ``idle_unload_s``."""
    entry = next(m for m in yaml.safe_load(CATALOG.read_text())["models"] if m["id"] == "tiny-llama")
    entry.update(checkpoint=str(TINY_LLAMA), tokenizer=str(TINY_LLAMA), idle_unload_s=idle_unload_s)
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    return path


@pytest.fixture(scope="module")
async def executor(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Executor]:
    work = tmp_path_factory.mktemp("executor")
    settings = ExecutorSettings(
        server=ServerSettings(port=0, grace_seconds=1), catalog=tiny_catalog(work, IDLE_S),
        triton=TritonSettings(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                              work_dir=work, exit_timeout_s=1, ready_timeout_s=180))
    ex = Executor(settings)
    await ex.start()
    yield ex
    await ex.stop(0)


def stub(ex: Executor) -> executor_pb2_grpc.ExecutorServiceStub:
    return executor_pb2_grpc.ExecutorServiceStub(grpc.aio.insecure_channel(f"127.0.0.1:{ex.server.port}"))


async def triton_says(ex: Executor) -> tuple[bool, str]:
    """(ModelReady, the repository index's state and reason) of tiny-llama, asked of Triton itself."""
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{ex.settings.triton.grpc_port}")
    try:
        ready = await client.is_model_ready("tiny-llama")
        index = await client.get_model_repository_index()
        entry = next(m for m in index.models if m.name == "tiny-llama")
        return bool(ready), f"{entry.state}/{entry.reason}"
    finally:
        await client.close()


async def state(ex: Executor) -> executor_pb2.ModelStatus:
    status = await stub(ex).GetStatus(executor_pb2.GetStatusRequest(), timeout=10)
    (model,) = [m for m in status.models if m.name == "tiny-llama"]
    assert (model.state == common_pb2.MODEL_STATE_LOADED) == ("tiny-llama" in status.ready_models)
    return model


def request(max_tokens: int = 8) -> executor_pb2.ExecutorGenerateRequest:
    ids = TokenizerBundle.from_dir(TINY_LLAMA).encode("Return the")
    req = executor_pb2.ExecutorGenerateRequest(model="tiny-llama", max_tokens=max_tokens, prompt_token_ids=ids)
    req.sampling.temperature = 0
    return req


async def generate(ex: Executor) -> list[int]:
    msgs = [m async for m in stub(ex).Generate(request(), timeout=120)]
    assert msgs[-1].finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    return [t for m in msgs for t in m.token_ids]


async def wait_for(ex: Executor, want: int, timeout: float) -> float:
    """Seconds until GetStatus says ``want``."""
    started = time.monotonic()
    while (await state(ex)).state != want:
        assert time.monotonic() - started < timeout, f"tiny-llama is {(await state(ex))} after {timeout}s"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_unload_and_load_through_the_executor(executor: Executor) -> None:
    expected = await generate(executor)  # also resets the idle clock
    assert (await state(executor)).state == common_pb2.MODEL_STATE_LOADED
    assert (await triton_says(executor))[0] is True

    resp = await stub(executor).UnloadModel(executor_pb2.UnloadModelRequest(model="tiny-llama"), timeout=60)
    assert resp.model.state == common_pb2.MODEL_STATE_UNLOADED
    ready, index = await triton_says(executor)
    assert not ready and index.startswith("UNAVAILABLE"), index  # Triton's own word: UNAVAILABLE/unloaded
    again = await stub(executor).UnloadModel(executor_pb2.UnloadModelRequest(model="tiny-llama"), timeout=60)
    assert again.model.state == common_pb2.MODEL_STATE_UNLOADED  # a no-op

    loaded = await stub(executor).LoadModel(executor_pb2.LoadModelRequest(model="tiny-llama"), timeout=120)
    assert loaded.model.state == common_pb2.MODEL_STATE_LOADED and loaded.load_s > 0
    assert (await triton_says(executor))[0] is True
    print(f"\nLoadModel: tiny-llama loaded in {loaded.load_s:.2f}s")
    assert await generate(executor) == expected  # the same weights, the same greedy answer

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(executor).LoadModel(executor_pb2.LoadModelRequest(model="nope"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_idle_model_is_unloaded_and_the_next_channel_request_loads_it(executor: Executor) -> None:
    address = f"127.0.0.1:{executor.server.port}"
    channel = ExecutorChannel(address, grpc.aio.insecure_channel(address), silence_s=10.0)
    try:
        # a sequence on the channel: the step backend now holds a stream (with its attach) on tiny-llama
        async with await channel.open(request(), timeout=60) as seq:
            expected = [t async for m in seq for t in m.token_ids]
        used = time.monotonic()
        await wait_for(executor, common_pb2.MODEL_STATE_UNLOADED, timeout=IDLE_S + 30)
        idle = time.monotonic() - used
        assert idle >= IDLE_S - 0.5, idle  # not before its idle period
        ready, index = await triton_says(executor)
        assert not ready and index.startswith("UNAVAILABLE"), index
        print(f"\nidle unload {idle:.1f}s after the last request (idle_unload_s {IDLE_S:g})")

        started = time.monotonic()
        async with await channel.open(request(), timeout=120) as seq:
            got = [t async for m in seq for t in m.token_ids]
        took = time.monotonic() - started
        assert got == expected
        assert (await state(executor)).state == common_pb2.MODEL_STATE_LOADED
        print(f"request to the unloaded model answered in {took:.2f}s (load included)")
    finally:
        await channel.close()


async def test_generate_on_an_unloaded_model_loads_it(executor: Executor) -> None:
    expected = await generate(executor)
    await stub(executor).UnloadModel(executor_pb2.UnloadModelRequest(model="tiny-llama"), timeout=60)
    assert (await state(executor)).state == common_pb2.MODEL_STATE_UNLOADED
    assert await generate(executor) == expected
    assert (await state(executor)).state == common_pb2.MODEL_STATE_LOADED
