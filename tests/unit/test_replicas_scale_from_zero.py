"""The router's side of scale to zero (``ReplicaSet.ensure_loaded`` through ``open``): a model that no replica has
loaded is loaded on one that can (one ``LoadModel`` however many requests wait), a request waits at most its
deadline, a failed load is UNAVAILABLE, and ``model_state`` says loaded / loading / unloaded. The executor is a
real gRPC server whose ``LoadModel`` takes a set time (Triton's load is tests/integration/test_model_control.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from inferplane.common.errors import DeadlineExceeded, Unavailable
from inferplane.common.server import channel_options
from inferplane.router.replicas import Replica, ReplicaSet
from inferplane.v1 import common_pb2, executor_pb2, executor_pb2_grpc

LOADED, UNLOADED = common_pb2.MODEL_STATE_LOADED, common_pb2.MODEL_STATE_UNLOADED


class SlowLoader(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, load_s: float, fail: bool = False) -> None:
        self.load_s, self.fail = load_s, fail
        self.loads: list[str] = []

    async def LoadModel(self, request: executor_pb2.LoadModelRequest,
                        context: grpc.aio.ServicerContext) -> executor_pb2.LoadModelResponse:
        self.loads.append(request.model)
        await asyncio.sleep(self.load_s)
        if self.fail:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Triton could not load model 'm': no memory")
        return executor_pb2.LoadModelResponse(model=executor_pb2.ModelStatus(name=request.model, state=LOADED),
                                              load_s=self.load_s)


async def served(loader: SlowLoader) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    executor_pb2_grpc.add_ExecutorServiceServicer_to_server(loader, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def scaled_to_zero(request: pytest.FixtureRequest) -> AsyncIterator[tuple[ReplicaSet, Replica, SlowLoader]]:
    loader = SlowLoader(*request.param)
    server, address = await served(loader)
    rs = ReplicaSet([address], channel_factory=lambda a: grpc.aio.insecure_channel(a, options=channel_options()))
    channel = grpc.aio.insecure_channel(address)
    # a replica that reported: SERVING, model "m" in its repository but not loaded
    replica = Replica(address, channel, executor_pb2_grpc.ExecutorServiceStub(channel), serving=True, reported=True,
                      states={"m": UNLOADED})
    rs.replicas[address] = replica
    yield rs, replica, loader
    await channel.close(None)
    await server.stop(0)


async def started(r: Replica) -> str:
    return r.address


@pytest.mark.parametrize("scaled_to_zero", [(0.3,)], indirect=True)
async def test_concurrent_requests_share_one_load_then_run(scaled_to_zero: tuple[ReplicaSet, Replica, SlowLoader]):
    rs, replica, loader = scaled_to_zero
    assert rs.serving_count("m") == 0 and rs.model_state("m") == UNLOADED
    woken = []
    rs.on_change = lambda: woken.append(rs.serving_count("m"))

    async def one() -> str:
        async with rs.open("m", started, request_id="r", wait_s=5) as address:
            return address

    tasks = [asyncio.create_task(one()) for _ in range(5)]
    await asyncio.sleep(0.1)
    assert rs.model_state("m") == common_pb2.MODEL_STATE_LOADING
    assert await asyncio.gather(*tasks) == [replica.address] * 5
    assert loader.loads == ["m"]  # one load for five requests
    assert rs.model_state("m") == LOADED and rs.serving_count("m") == 1
    assert woken and woken[-1] == 1  # the capacity's waiters were woken with the model loaded
    async with rs.open("m", started, wait_s=5):  # loaded: no second load
        pass
    assert loader.loads == ["m"]


@pytest.mark.parametrize("scaled_to_zero", [(1.0,)], indirect=True)
async def test_a_request_waits_no_longer_than_its_deadline(scaled_to_zero: tuple[ReplicaSet, Replica, SlowLoader]):
    rs, _, loader = scaled_to_zero
    with pytest.raises(DeadlineExceeded, match="did not finish loading within the request's deadline"):
        async with rs.open("m", started, wait_s=0.2):
            pass
    # the load goes on for the others: a request with time enough gets the model
    async with rs.open("m", started, wait_s=5) as address:
        assert address
    assert loader.loads == ["m"]


@pytest.mark.parametrize("scaled_to_zero", [(0.05, True)], indirect=True)
async def test_a_failed_load_is_unavailable_with_the_reason(scaled_to_zero: tuple[ReplicaSet, Replica, SlowLoader]):
    rs, _, _ = scaled_to_zero
    with pytest.raises(Unavailable, match="could not be loaded: Triton could not load model 'm': no memory"):
        async with rs.open("m", started, wait_s=5):
            pass
    assert rs.model_state("m") == UNLOADED


@pytest.mark.parametrize("scaled_to_zero", [(0.05,)], indirect=True)
async def test_a_model_no_replica_has_is_not_loaded(scaled_to_zero: tuple[ReplicaSet, Replica, SlowLoader]):
    rs, _, loader = scaled_to_zero
    with pytest.raises(Unavailable, match="no executor is available for model 'other'"):
        async with rs.open("other", started, wait_s=5):
            pass
    assert loader.loads == [] and rs.model_state("other") == common_pb2.MODEL_STATE_UNSPECIFIED
