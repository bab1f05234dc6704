"""The KServe v2 protocol through the router and a real executor and Triton: ``tritonclient`` unmodified.

A real metering server (SQLite), a real executor (spawned Triton with the shipped embedding model), a real router;
the catalog's ``minilm-raw`` (task ``infer``, $0.000001 a request) names the embedding's Triton model. Over gRPC,
``tritonclient.grpc`` talks to the router's port; over HTTP, the gateway app (separate, and in the router's
process) gets bodies that ``tritonclient.http`` itself builds and answers that it itself parses, binary data on.
Each answer is compared with the same call made straight to Triton, and each answered request must leave exactly
one usage record at the per-request price; refusals leave none.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc.aio as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from inferplane.assets import CATALOG
from inferplane.cli.inprocess import InProcessRouter
from inferplane.cli.launcher import free_port
from inferplane.common.money import PriceNanos
from inferplane.common.settings import ServerSettings
from inferplane.executor.main import Executor
from inferplane.executor.settings import ExecutorSettings, TritonSettings
from inferplane.gateway.app import create_app
from inferplane.gateway.settings import GatewaySettings
from inferplane.router.main import Router
from inferplane.router.settings import RouterSettings
from tests.integration.test_admission import Metering, metering  # noqa: F401  (fixture)

pytestmark = pytest.mark.triton

MODEL, TRITON_MODEL = "minilm-raw", "all-minilm-l6-v2"
PER_REQUEST = 1_000  # nano-dollars: the catalog's "0.000001"
IDS = np.array([[101, 7592, 2088, 102]], dtype=np.int64)  # [CLS] hello world [SEP]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'metering.db'}"


@pytest_asyncio.fixture(scope="module")
async def executor(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Executor]:
    work = tmp_path_factory.mktemp("kserve-executor")
    settings = ExecutorSettings(
        server=ServerSettings(port=0, grace_seconds=1), catalog=CATALOG, models=[TRITON_MODEL],
        triton=TritonSettings(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                              work_dir=work, exit_timeout_s=1, ready_timeout_s=180, torch_threads=1))
    ex = Executor(settings)
    await ex.start()
    yield ex
    await ex.stop(0)


@pytest_asyncio.fixture
async def router(executor: Executor, metering: Metering, tmp_path: Path) -> AsyncIterator[Router]:  # noqa: F811
    metering.store.set_price(MODEL, PriceNanos(per_request=PER_REQUEST))
    r = Router(RouterSettings(server=ServerSettings(port=0, grace_seconds=0),
                              metering_addr=f"127.0.0.1:{metering.server.port}",
                              executor_addrs=[f"127.0.0.1:{executor.server.port}"], outbox_path=tmp_path / "outbox.db",
                              request_timeout_s=30))
    await r.start()
    try:
        yield r
    finally:
        await r.stop(0)


def inputs(ids: np.ndarray = IDS) -> list[grpcclient.InferInput]:
    out = []
    for name, array in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
        tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


async def direct(executor: Executor) -> np.ndarray:
    """The same request straight to Triton (the reference)."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{executor.settings.triton.grpc_port}")
    try:
        result = await client.infer(TRITON_MODEL, inputs())
    finally:
        await client.close()
    out = result.as_numpy("embedding")
    assert out is not None and out.shape == (1, 384)
    return out


async def usage(metering: Metering, key_id: str, n: int) -> list:  # noqa: F811
    """The key's records once ``n`` have arrived (the outbox sends them in the background)."""
    for _ in range(200):
        rows = metering.store.list_usage(key_id)
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.05)
    return metering.store.list_usage(key_id)


async def test_tritonclient_grpc_infer_is_answered_and_billed_per_request(
        executor: Executor, router: Router, metering: Metering) -> None:  # noqa: F811
    _, key = metering.store.create_key("kserve")
    info = await metering.client.verify_key(key, timeout=5)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{router.server.port}")
    auth = {"authorization": f"Bearer {key}"}
    try:
        results = [await client.infer(MODEL, inputs(), headers=auth) for _ in range(3)]
        meta = await client.get_model_metadata(MODEL, headers=auth)
        config = await client.get_model_config(MODEL, headers=auth)
        assert await client.is_model_ready(MODEL, headers=auth)
        assert await client.is_server_live(headers=auth) and await client.is_server_ready(headers=auth)
    finally:
        await client.close()
    want = await direct(executor)
    for result in results:
        np.testing.assert_array_equal(result.as_numpy("embedding"), want)
        assert result.get_response().model_name == MODEL  # never Triton's name
    assert meta.name == MODEL and [t.name for t in meta.inputs] == ["input_ids", "attention_mask"]
    assert [t.name for t in meta.outputs] == ["embedding"]
    assert config.config.name == MODEL and not config.config.parameters  # no paths of the executor's disk
    rows = await usage(metering, info.key_id, 3)
    assert len(rows) == 3 and len({r.request_id for r in rows}) == 3  # metadata and readiness are free
    assert all(r.model == MODEL and r.cost_nanos == PER_REQUEST and r.prompt_tokens == 0
               and r.completion_tokens == 0 and r.finish_reason == "stop" for r in rows)


async def test_refusals_over_grpc_leave_no_record(executor: Executor, router: Router,
                                                  metering: Metering) -> None:  # noqa: F811
    _, key = metering.store.create_key("kserve-refusals")
    info = await metering.client.verify_key(key, timeout=5)
    auth = {"authorization": f"Bearer {key}"}
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{router.server.port}")

    async def refused(**kw: object) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as caught:
            await client.infer(**kw)
        return caught.value

    try:
        assert (await refused(model_name=MODEL, inputs=inputs())).status() == "StatusCode.UNAUTHENTICATED"
        assert (await refused(model_name="no-such-model", inputs=inputs(), headers=auth)).status() == \
            "StatusCode.NOT_FOUND"
        # a chat model is not a raw tensor model: its tokens are billed through /v1 only
        assert (await refused(model_name="tiny-llama", inputs=inputs(), headers=auth)).status() == \
            "StatusCode.NOT_FOUND"
        # Triton's own refusal passes through (an INT32 id tensor), and ejects no replica: the next one is served
        bad = grpcclient.InferInput("input_ids", [1, 4], "INT32")
        bad.set_data_from_numpy(IDS.astype(np.int32))
        assert (await refused(model_name=MODEL, inputs=[bad], headers=auth)).status() == \
            "StatusCode.INVALID_ARGUMENT"
        np.testing.assert_array_equal((await client.infer(MODEL, inputs(), headers=auth)).as_numpy("embedding"),
                                      await direct(executor))
    finally:
        await client.close()
    rows = await usage(metering, info.key_id, 1)
    assert len(rows) == 1 and rows[0].cost_nanos == PER_REQUEST  # only the one answered


async def test_model_control_and_shared_memory_are_unimplemented(executor: Executor, router: Router,
                                                                 metering: Metering) -> None:  # noqa: F811
    _, key = metering.store.create_key("kserve-control")
    auth = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.server.port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for call in (stub.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name=TRITON_MODEL),
                                                metadata=auth),
                     stub.SystemSharedMemoryStatus(service_pb2.SystemSharedMemoryStatusRequest(), metadata=auth),
                     stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), metadata=auth)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        request = service_pb2.ModelInferRequest(model_name=MODEL)
        tensor = request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 4])
        tensor.parameters["shared_memory_region"].string_param = "someone-elses"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(request, metadata=auth)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await executor.client.is_ready([TRITON_MODEL])  # still loaded


# --- HTTP: the gateway's /v2 routes, both edge modes ------------------------------------------------------

@pytest_asyncio.fixture
async def http(router: Router, metering: Metering) -> AsyncIterator[dict[str, httpx.AsyncClient]]:  # noqa: F811
    settings = GatewaySettings(router_addr=f"127.0.0.1:{router.server.port}",
                               metering_addr=f"127.0.0.1:{metering.server.port}", request_timeout_s=30)
    apps = {"separate": create_app(settings),
            "in-router": create_app(settings, router=InProcessRouter(router.servicer, timeout_s=30,
                                                                     serving=lambda: True, kserve=router.kserve))}
    async with AsyncExitStack() as stack:
        out = {}
        for mode, app in apps.items():
            await stack.enter_async_context(app.router.lifespan_context(app))
            out[mode] = await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw"))
        yield out


def http_request(*, binary: bool) -> tuple[bytes, dict[str, str]]:
    """The body and headers ``tritonclient.http`` sends for ``infer`` (binary data as it defaults to, or JSON)."""
    tensors = []
    for name in ("input_ids", "attention_mask"):
        tensor = httpclient.InferInput(name, list(IDS.shape), "INT64")
        tensor.set_data_from_numpy(IDS if name == "input_ids" else np.ones_like(IDS), binary_data=binary)
        tensors.append(tensor)
    outputs = [httpclient.InferRequestedOutput("embedding", binary_data=binary)]
    body, json_size = httpclient.InferenceServerClient.generate_request_body(tensors, outputs=outputs)
    return body, ({"Inference-Header-Content-Length": str(json_size)} if json_size is not None else {})


@pytest.mark.parametrize("binary", [True, False])
async def test_tritonclient_http_bodies_both_edge_modes(http: dict[str, httpx.AsyncClient], executor: Executor,
                                                        metering: Metering, binary: bool) -> None:  # noqa: F811
    _, key = metering.store.create_key("kserve-http")
    info = await metering.client.verify_key(key, timeout=5)
    want = await direct(executor)
    body, headers = http_request(binary=binary)
    for client in http.values():
        resp = await client.post(f"/v2/models/{MODEL}/infer", content=body,
                                 headers={**headers, "authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.text
        length = resp.headers.get("inference-header-content-length")
        assert (length is not None) == binary
        result = httpclient.InferResult.from_response_body(resp.content, header_length=int(length) if length else None)
        np.testing.assert_allclose(result.as_numpy("embedding"), want, rtol=0 if binary else 1e-6)
        assert result.get_response()["model_name"] == MODEL
        meta = await client.get(f"/v2/models/{MODEL}", headers={"authorization": f"Bearer {key}"})
        assert meta.json()["inputs"][0] == {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}
        ready = await client.get(f"/v2/models/{MODEL}/ready", headers={"authorization": f"Bearer {key}"})
        assert ready.status_code == 200
    rows = await usage(metering, info.key_id, 2)
    assert len(rows) == 2 and all(r.cost_nanos == PER_REQUEST and r.model == MODEL for r in rows)


async def test_http_refusals_are_the_protocols_shape(http: dict[str, httpx.AsyncClient],
                                                     metering: Metering) -> None:  # noqa: F811
    _, key = metering.store.create_key("kserve-http-refusals")
    info = await metering.client.verify_key(key, timeout=5)
    auth = {"authorization": f"Bearer {key}"}
    body, headers = http_request(binary=True)
    for mode, client in http.items():
        cases = [
            (f"/v2/models/{MODEL}/infer", body, headers, 401),  # no key
            ("/v2/models/no-such-model/infer", body, {**headers, **auth}, 404),
            (f"/v2/models/{MODEL}/infer", body[:-8], {**headers, **auth}, 400),  # binary data cut short
            (f"/v2/models/{MODEL}/infer", body + b"more", {**headers, **auth}, 400),  # bytes left over
            (f"/v2/models/{MODEL}/infer", b'{"inputs": [], "extra": 1}', auth, 400),
        ]
        for path, content, hdrs, status in cases:
            resp = await client.post(path, content=content, headers=hdrs)
            assert resp.status_code == status, (mode, path, resp.text)
            assert isinstance(resp.json()["error"], str)  # {"error": "<message>"}: what tritonclient reads
    assert metering.store.list_usage(info.key_id) == []
