"""Model control on the real launcher (``LocalStack``: metering, router, executor with its Triton, Envoy).

Scale to zero, with a catalog giving tiny-llama a short ``idle_unload_s``: after the idle period Triton says the
model is unloaded and ``/v1/models`` says ``unloaded``; the next request is answered (it waited while the router had
the executor load the model: the cold start and the request's latency are printed); concurrent requests to the
unloaded model share one load.

Upload: a copy of tiny-llama as a tarball through Envoy's ``/admin/models/upload`` → checked, in the catalog with
its price, rendered and loaded by the executor → served, each request billed at its own price and stamped with its
version → deleted: 404 in OpenAI's shape and unloaded from Triton; a header claiming 70B parameters → 422 with the
numbers; a tarball with ``../`` → 400 and nothing written outside its folder. A Triton model directory
(``kind=triton``, tests/data/triton_add_one) → served through the KServe v2 edge by ``tritonclient.grpc`` and
``tritonclient.http``, billed per request → deleted: 404 and unloaded; another backend → 400.

A stack of its own, so that the session's stack (tests/e2e/conftest.py) keeps its model loaded and its repository
as it was."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from inferplane.assets import CATALOG, TINY_LLAMA
from inferplane.cli.launcher import LocalStack, StackConfig
from inferplane.common.catalog import PACKAGE_PREFIX
from inferplane.common.money import PriceNanos
from inferplane.metering.cli import register as register_cli
from inferplane.metering.secret import load_secret
from inferplane.metering.store import MeteringStore, UsageRow

pytestmark = [pytest.mark.e2e]
MODEL = "tiny-llama"
IDLE_S = 6.0


def catalog_with_idle(folder: Path) -> Path:
    """The shipped catalog with tiny-llama's ``idle_unload_s`` set (relative paths made absolute)."""
    data = yaml.safe_load(CATALOG.read_text())
    for model in data["models"]:
        for name in ("checkpoint", "tokenizer"):
            value = model.get(name)
            if value and not str(value).startswith(PACKAGE_PREFIX):
                model[name] = str((CATALOG.parent / value).resolve())
        if model["id"] == MODEL:
            model["idle_unload_s"] = IDLE_S
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    state = tmp_path_factory.mktemp("scale-to-zero")
    cfg = StackConfig(state_dir=state, catalog=catalog_with_idle(state), ports=dict.fromkeys(StackConfig().ports, 0),
                      ready_timeout_s=300, trace_exporter="none")
    local = LocalStack(cfg, log=print)
    try:
        local.start()
        local.api_key = local.create_demo_key()  # type: ignore[attr-defined]
    except Exception:
        local.stop()
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((state / "logs").glob("*.log")))
        raise RuntimeError(f"stack did not start\n{logs}") from None
    yield local
    local.stop()


def headers(stack: LocalStack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}"}  # type: ignore[attr-defined]


async def chat(http: httpx.AsyncClient, stack: LocalStack) -> tuple[httpx.Response, float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
            "temperature": 0}
    started = time.monotonic()
    resp = await http.post(f"{stack.base_url}/chat/completions", json=body, headers=headers(stack))
    return resp, time.monotonic() - started


def triton_ready(stack: LocalStack) -> tuple[bool, str]:
    """Triton's own word on tiny-llama: ModelReady, and its repository index's state/reason."""
    client = triton_grpc.InferenceServerClient(f"{stack.cfg.host}:{stack.ports['triton_grpc']}")
    try:
        entry = next(m for m in client.get_model_repository_index().models if m.name == MODEL)
        return bool(client.is_model_ready(MODEL)), f"{entry.state}/{entry.reason}"
    finally:
        client.close()


def listed_state(stack: LocalStack) -> str | None:
    resp = httpx.get(f"{stack.base_url}/models", headers=headers(stack), timeout=10)
    resp.raise_for_status()
    return next(m.get("state") for m in resp.json()["data"] if m["id"] == MODEL)


async def until_state(stack: LocalStack, state: str, within_s: float = 60) -> None:
    """Wait for the listed state: the router derives it from the executors' status, read every second (a loaded
    machine may delay a read, and a replica whose status is late is not counted)."""
    deadline = time.monotonic() + within_s
    while (listed := listed_state(stack)) != state:
        assert time.monotonic() < deadline, f"{MODEL} listed as {listed}, not {state}, after {within_s}s"
        await asyncio.sleep(0.2)


def cold_starts(stack: LocalStack) -> tuple[float, float]:
    """(count, sum) of the router's ``inferplane_router_model_cold_start_seconds`` for tiny-llama."""
    text = httpx.get(stack.metrics_url("router"), timeout=10).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.labels.get("model") == MODEL and s.name.startswith("inferplane_router_model_cold_start")}
    return (samples.get("inferplane_router_model_cold_start_seconds_count", 0.0),
            samples.get("inferplane_router_model_cold_start_seconds_sum", 0.0))


async def wait_unloaded(stack: LocalStack, since: float) -> float:
    """Seconds from ``since`` (the last request's end) until Triton says tiny-llama is unloaded."""
    while True:
        ready, index = await asyncio.to_thread(triton_ready, stack)
        if not ready and index.startswith("UNAVAILABLE"):  # UNLOADING on the way
            return time.monotonic() - since
        assert time.monotonic() - since < IDLE_S + 60, "tiny-llama was not unloaded"
        await asyncio.sleep(0.25)


async def test_an_idle_model_scales_to_zero_and_the_next_request_is_answered(stack: LocalStack) -> None:
    async with httpx.AsyncClient(timeout=180) as http:
        # the stack's start may outlast the idle period (then the first request loads the model): the second is warm
        for _ in range(2):
            resp, warm = await chat(http, stack)
            assert resp.status_code == 200, resp.text
        await until_state(stack, "loaded")
        idle = await wait_unloaded(stack, time.monotonic())
        assert idle >= IDLE_S - 1.0, idle  # not before its idle period (the clock started at the request's end)
        await until_state(stack, "unloaded")  # the router reads the executors' status every second

        loads_before, load_s_before = cold_starts(stack)
        resp, cold = await chat(http, stack)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"]
        assert (await asyncio.to_thread(triton_ready, stack))[0] is True
        await until_state(stack, "loaded")
        loads, load_s = cold_starts(stack)
        assert loads == loads_before + 1
        load_s -= load_s_before
        print(f"\nscale to zero: unloaded {idle:.1f}s after the last request (idle_unload_s {IDLE_S:g}); "
              f"warm request {warm:.2f}s; cold start (router: load asked -> loaded) {load_s:.2f}s; "
              f"the request that found the model unloaded: {cold:.2f}s")

        # several requests for the unloaded model: one load, every one of them answered
        await wait_unloaded(stack, time.monotonic())
        results = await asyncio.gather(*(chat(http, stack) for _ in range(4)))
        assert [r.status_code for r, _ in results] == [200] * 4, [r.text for r, _ in results]
        assert cold_starts(stack)[0] == loads + 1
        print(f"4 concurrent requests on the unloaded model, one load: {[round(t, 2) for _, t in results]}s")

    router_log = (stack.state / "logs" / "router.log").read_text()
    assert f"model {MODEL} is loaded on no executor: asking" in router_log
    assert f"model {MODEL} loaded on" in router_log
    executor_log = (stack.state / "logs" / "executor.log").read_text()
    assert f"progress: model {MODEL} unloaded in" in executor_log and "idle for" in executor_log
    assert f"progress: model {MODEL} loaded in" in executor_log


def tarball(folder: Path, arcname: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return buf.getvalue()


def upload(stack: LocalStack, model_id: str, body: bytes, **price: str) -> httpx.Response:
    admin = {"Authorization": f"Bearer {stack.create_admin_key()}", "Content-Type": "application/gzip"}
    root = stack.base_url.removesuffix("/v1")
    return httpx.post(f"{root}/admin/models/upload", params={"id": model_id, **price}, content=body, headers=admin,
                      timeout=300)


def listed(stack: LocalStack) -> dict[str, dict]:
    resp = httpx.get(f"{stack.base_url}/models", headers=headers(stack), timeout=10)
    return {m["id"]: m for m in resp.json()["data"]}


def usage_of(stack: LocalStack, model_id: str, count: int) -> list[UsageRow]:
    """The usage records of ``model_id`` in metering's store, once there are ``count`` of them (they reach metering
    through the router's outbox)."""
    store = MeteringStore(f"sqlite:///{stack.state / 'metering.db'}",
                          load_secret(secret=None, secret_file=stack.state / "metering-secret"))
    try:
        deadline = time.monotonic() + 30
        while len(rows := [r for r in store.list_usage(limit=1000) if r.model == model_id]) < count:
            assert time.monotonic() < deadline, f"{len(rows)} usage records of {model_id}, not {count}"
            time.sleep(0.2)
        return rows
    finally:
        store.close()


def triton_state(stack: LocalStack, name: str) -> str:
    """Triton's repository index entry of ``name`` (``state/reason``; ``absent`` when the repository lacks it)."""
    client = triton_grpc.InferenceServerClient(f"{stack.cfg.host}:{stack.ports['triton_grpc']}")
    try:
        entry = next((m for m in client.get_model_repository_index().models if m.name == name), None)
        return "absent" if entry is None else f"{entry.state}/{entry.reason}"
    finally:
        client.close()


async def until_triton_unloads(stack: LocalStack, name: str, within_s: float = 60) -> str:
    deadline = time.monotonic() + within_s
    while (state := await asyncio.to_thread(triton_state, stack, name)).startswith(("READY", "UNLOADING")):
        assert time.monotonic() < deadline, f"Triton still has {name}: {state}"
        await asyncio.sleep(0.25)
    return state


async def test_an_uploaded_copy_of_tiny_llama_is_checked_listed_loaded_served_billed_and_deleted(
        stack: LocalStack) -> None:
    """The issue's acceptance: a copy of tiny-llama uploaded as ``my-finetune`` with its own price → listed with the
    price → chat completions work → usage billed at its price, stamped with its version → delete → 404 in OpenAI's
    shape (and Triton unloads it)."""
    body = tarball(TINY_LLAMA, "my-finetune")
    started = time.monotonic()
    resp = upload(stack, "my-finetune", body, input_per_million="0.30", output_per_million="1.20",
                  per_request="0.000001")
    assert resp.status_code == 201, resp.text
    made = resp.json()
    up = made["upload"]
    assert up["kind"] == "checkpoint"
    assert up["sha256"] == hashlib.sha256(body).hexdigest() and up["bytes"] == len(body)
    assert up["parameters"] > 0 and up["needed_bytes"] <= up["free_bytes"]
    assert made["triton_model"] == "my-finetune" and made["price"]["input_per_million_tokens"] == "0.3"
    assert Path(up["folder"]).is_relative_to(stack.state / "uploads")
    deadline = time.monotonic() + 120
    while listed(stack).get("my-finetune", {}).get("state") != "loaded":  # metering -> executor: rendered, loaded
        assert time.monotonic() < deadline, listed(stack).get("my-finetune")
        await asyncio.sleep(0.5)
    ready_s = time.monotonic() - started
    entry = listed(stack)["my-finetune"]
    assert entry["pricing"]["input_per_million_tokens"] == "0.3"
    assert entry["pricing"]["output_per_million_tokens"] == "1.2"
    assert entry["pricing"]["per_request"] == "0.000001"
    replies = []
    async with httpx.AsyncClient(timeout=120) as http:
        body_json = {"model": "my-finetune", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
                     "temperature": 0}
        for n in range(2):
            reply = await http.post(f"{stack.base_url}/chat/completions", json=body_json,
                                    headers={**headers(stack), "x-request-id": f"my-finetune-billed-{n}"})
            assert reply.status_code == 200, reply.text
            assert reply.json()["model"] == "my-finetune" and reply.json()["usage"]["completion_tokens"] > 0
            replies.append(reply.json())
        # the same weights as tiny-llama: the same greedy answer
        same = await http.post(f"{stack.base_url}/chat/completions", json={**body_json, "model": MODEL},
                               headers=headers(stack))
        assert same.json()["choices"][0]["message"]["content"] == replies[0]["choices"][0]["message"]["content"]

    # billed at its own price, stamped with its version: one record per request, exact nano-dollars
    rows = {r.request_id: r for r in await asyncio.to_thread(usage_of, stack, "my-finetune", 2)}
    assert sorted(rows) == ["my-finetune-billed-0", "my-finetune-billed-1"], sorted(rows)
    for n, reply in enumerate(replies):
        usage, row = reply["usage"], rows[f"my-finetune-billed-{n}"]
        assert (row.prompt_tokens, row.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
        # $0.30 and $1.20 a million tokens are 300 and 1,200 nano-dollars a token; $0.000001 a request is 1,000
        assert row.cost_nanos == 300 * usage["prompt_tokens"] + 1_200 * usage["completion_tokens"] + 1_000
        assert row.cost_nanos == PriceNanos(300_000_000, 1_200_000_000, 1_000).cost(usage["prompt_tokens"],
                                                                                    usage["completion_tokens"])
        assert row.price_version == made["price"]["version"] and row.model_version == 1

    admin = {"Authorization": f"Bearer {stack.create_admin_key()}"}
    root = stack.base_url.removesuffix("/v1")
    async with httpx.AsyncClient(timeout=60) as http:
        gone = await http.delete(f"{root}/admin/models/my-finetune", headers=admin)
        assert gone.status_code == 200 and gone.json()["deleted"] is True, gone.text
        deadline = time.monotonic() + 30
        while (after := await http.post(f"{stack.base_url}/chat/completions", json=body_json,
                                        headers=headers(stack))).status_code != 404:
            assert after.status_code == 200 and time.monotonic() < deadline, after.text  # the router's poll (2 s)
            await asyncio.sleep(0.2)
    error = after.json()
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}, error
    assert error["error"]["code"] == "model_not_found" and error["error"]["param"] == "model"
    assert "my-finetune" in error["error"]["message"]
    assert "my-finetune" not in listed(stack)
    unloaded = await until_triton_unloads(stack, "my-finetune")
    print(f"\nupload: {len(body)} bytes, {up['parameters']:,} parameters; listed and loaded {ready_s:.1f}s after "
          f"the upload began; billed {[r.cost_nanos for r in rows.values()]} nano-dollars; after delete Triton "
          f"says {unloaded}")


def test_a_header_claiming_70b_parameters_is_refused_with_the_numbers(stack: LocalStack, tmp_path: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_LLAMA / name, folder / name)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
              "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192}
    (folder / "config.json").write_text(json.dumps(config))
    header = {"model.embed_tokens.weight": {"dtype": "BF16", "shape": [128256, 8192], "data_offsets": [0, 0]},
              "model.layers.weights": {"dtype": "BF16", "shape": [80, 868_000_000], "data_offsets": [0, 0]}}
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    before = sorted(p.name for p in (stack.state / "uploads").iterdir())
    resp = upload(stack, "too-big", tarball(folder, "too-big"))
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    params = 128256 * 8192 + 80 * 868_000_000
    assert error["code"] == "model_does_not_fit"
    assert f"{params:,} parameters x 2 bytes per parameter" in error["message"]
    assert "too many" in error["message"] and "free RAM" in error["message"]
    assert sorted(p.name for p in (stack.state / "uploads").iterdir()) == before  # nothing kept
    assert "too-big" not in listed(stack)
    print(f"\n70B header: {resp.status_code} {error['message']}")


def test_a_tarball_leaving_its_folder_is_refused_and_nothing_is_written(stack: LocalStack) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("evil/config.json", b"{}"), ("evil/../../escaped.txt", b"pwned")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    before = sorted(p.name for p in (stack.state / "uploads").iterdir())
    resp = upload(stack, "evil", buf.getvalue())
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert "leaves the upload's folder" in error["message"] and error["param"] == "file"
    assert sorted(p.name for p in (stack.state / "uploads").iterdir()) == before
    assert list((stack.state / "uploads" / ".incoming").iterdir()) == []
    assert not (stack.state / "escaped.txt").exists() and not (stack.state.parent / "escaped.txt").exists()


ADD_ONE = Path(__file__).resolve().parents[1] / "data" / "triton_add_one"  # config.pbtxt + 1/model.py: x + 1
RAW_PRICE_NANOS = 3_000  # $0.000003 a request


def add_one_inputs(module: Any, x: np.ndarray) -> list[Any]:
    tensor = module.InferInput("INPUT0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # tritonclient.http: binary data, its default
    return [tensor]


async def test_an_uploaded_triton_model_directory_is_served_through_the_kserve_edge_billed_and_deleted(
        stack: LocalStack) -> None:
    """Issue 15 item 2b: a Python-backend Triton model directory uploaded with ``kind=triton`` and a per-request price
    → checked, in the catalog as an ``infer`` model, copied into the executor's repository and loaded → listed with
    its state and price → ``tritonclient.grpc`` and ``tritonclient.http`` ``infer`` at Envoy's port with the key →
    one usage record per call at the per-request price → delete → the KServe routes answer 404 and Triton unloads
    it (and the repository no longer has it)."""
    body = tarball(ADD_ONE, "add-one")
    started = time.monotonic()
    resp = upload(stack, "add-one", body, kind="triton", per_request="0.000003")
    assert resp.status_code == 201, resp.text
    made = resp.json()
    up = made["upload"]
    assert up["kind"] == "triton" and up["backend"] == "python" and up["served_versions"] == [1]
    assert up["sha256"] == hashlib.sha256(body).hexdigest()
    assert up["weight_bytes"] == (ADD_ONE / "1" / "model.py").stat().st_size
    assert made["triton_model"] == "add-one" and made["settings"]["tasks"] == ["infer"]
    assert made["price"]["per_request"] == "0.000003"
    deadline = time.monotonic() + 120
    while listed(stack).get("add-one", {}).get("state") != "loaded":  # metering -> executor: copied, loaded
        assert time.monotonic() < deadline, listed(stack).get("add-one")
        await asyncio.sleep(0.5)
    ready_s = time.monotonic() - started
    entry = listed(stack)["add-one"]
    assert entry["pricing"]["per_request"] == "0.000003" and entry["pricing"]["input_per_million_tokens"] == "0"
    assert (await asyncio.to_thread(triton_state, stack, "add-one")).startswith("READY")

    auth = {"authorization": f"Bearer {stack.api_key}"}  # type: ignore[attr-defined]
    edge = stack.base_url.removesuffix("/v1").removeprefix("http://")
    x = np.array([1.5, -2.0, 41.0], dtype=np.float32)
    over_grpc = triton_grpc.InferenceServerClient(stack.grpc_addr)  # Envoy's port
    over_http = triton_http.InferenceServerClient(edge)
    try:
        got = over_grpc.infer("add-one", add_one_inputs(triton_grpc, x), headers=auth)
        np.testing.assert_array_equal(got.as_numpy("OUTPUT0"), x + 1)
        got_http = over_http.infer("add-one", add_one_inputs(triton_http, x), headers=dict(auth))
        np.testing.assert_array_equal(got_http.as_numpy("OUTPUT0"), x + 1)
        assert got_http.get_response()["model_name"] == "add-one"
    finally:
        over_grpc.close()
        over_http.close()
    rows = await asyncio.to_thread(usage_of, stack, "add-one", 2)
    assert len(rows) == 2 and all(r.cost_nanos == RAW_PRICE_NANOS for r in rows), rows
    assert all((r.prompt_tokens, r.completion_tokens, r.model_version) == (0, 0, 1) for r in rows), rows
    assert all(r.price_version == made["price"]["version"] for r in rows)

    admin = {"Authorization": f"Bearer {stack.create_admin_key()}"}
    root = stack.base_url.removesuffix("/v1")
    infer_json = {"inputs": [{"name": "INPUT0", "shape": [3], "datatype": "FP32", "data": x.tolist()}]}
    async with httpx.AsyncClient(timeout=60) as http:
        gone = await http.delete(f"{root}/admin/models/add-one", headers=admin)
        assert gone.status_code == 200, gone.text
        deadline, answered = time.monotonic() + 30, 2
        while (after := await http.post(f"{root}/v2/models/add-one/infer", headers=auth,
                                        json=infer_json)).status_code != 404:
            assert after.status_code == 200 and time.monotonic() < deadline, after.text  # the router's poll (2 s)
            answered += 1  # served (and billed) until the router's catalog drops the model
            await asyncio.sleep(0.2)
    assert set(after.json()) == {"error"} and "add-one" in after.json()["error"], after.text  # KServe's shape
    with pytest.raises(InferenceServerException) as caught:
        triton_grpc.InferenceServerClient(stack.grpc_addr).infer("add-one", add_one_inputs(triton_grpc, x),
                                                                 headers=auth)
    assert caught.value.status() == "StatusCode.NOT_FOUND", caught.value
    unloaded = await until_triton_unloads(stack, "add-one")
    copied = stack.state / "executor" / "model_repository" / "add-one"
    deadline = time.monotonic() + 30
    while copied.exists():  # removed from the repository once Triton unloaded it
        assert time.monotonic() < deadline, f"{copied} is still there"
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # a stray record would reach metering through the router's outbox by now
    # one record per answered call; the refused ones (404) left none
    rows = await asyncio.to_thread(usage_of, stack, "add-one", answered)
    assert len(rows) == answered and {r.cost_nanos for r in rows} == {RAW_PRICE_NANOS}
    print(f"\ntriton upload: {len(body)} bytes; listed and loaded {ready_s:.1f}s after the upload began; "
          f"each call billed {RAW_PRICE_NANOS} nano-dollars; {answered - 2} answered between the delete and the "
          f"router's catalog poll; after delete Triton says {unloaded}")


def test_a_triton_directory_with_another_backend_or_token_prices_is_refused(stack: LocalStack, tmp_path: Path) -> None:
    folder = tmp_path / "onnx-one"
    shutil.copytree(ADD_ONE, folder)
    (folder / "config.pbtxt").write_text('backend: "onnxruntime"\nmax_batch_size: 0\n')
    before = sorted(p.name for p in (stack.state / "uploads").iterdir())
    resp = upload(stack, "onnx-one", tarball(folder, "onnx-one"), kind="triton", per_request="0.000003")
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert "only the Python backend is accepted here" in error["message"] and error["param"] == "config.pbtxt"
    assert sorted(p.name for p in (stack.state / "uploads").iterdir()) == before  # nothing kept
    resp = upload(stack, "add-two", tarball(ADD_ONE, "add-two"), kind="triton", input_per_million="0.10",
                  per_request="0.000003")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input_per_million", resp.text
    resp = upload(stack, "add-two", tarball(ADD_ONE, "add-two"), kind="triton")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "per_request", resp.text
    resp = upload(stack, "add-two", tarball(ADD_ONE, "add-two"), kind="onnx", per_request="0.000003")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "kind", resp.text
    resp = upload(stack, "add-two", tarball(ADD_ONE, "add-two"), per_request="0.000003")  # kind left out: a checkpoint
    assert resp.status_code == 400 and "kind=triton" in resp.json()["error"]["message"], resp.text
    assert "onnx-one" not in listed(stack) and "add-two" not in listed(stack)


def models_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="inferplane")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_inferplane_models_upload_sends_a_triton_directory(stack: LocalStack, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``inferplane models upload ID --triton-dir DIR --per-request USD``: tarred, streamed to the running stack's
    upload route, checked there; its refusals are the CLI's errors (exit 2)."""
    root = stack.base_url.removesuffix("/v1")
    key = stack.create_admin_key()
    folder = tmp_path / "onnx-two"
    shutil.copytree(ADD_ONE, folder)
    (folder / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    assert models_cli("models", "upload", "onnx-two", "--triton-dir", str(folder), "--per-request", "0.000003",
                      "--edge", root, "--admin-key", key) == 2
    assert "400: config.pbtxt names backend 'onnxruntime': only the Python backend" in capsys.readouterr().err
    capsys.readouterr()
    assert models_cli("models", "upload", "add-two", "--triton-dir", str(ADD_ONE), "--per-request", "0.000003",
                      "--edge", root, "--admin-key", key) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["id"] == "add-two" and made["upload"]["kind"] == "triton" and made["settings"]["tasks"] == ["infer"]
    assert made["price"]["per_request"] == "0.000003"
    try:
        deadline = time.monotonic() + 120
        while listed(stack).get("add-two", {}).get("state") != "loaded":
            assert time.monotonic() < deadline, listed(stack).get("add-two")
            time.sleep(0.5)
    finally:
        httpx.delete(f"{root}/admin/models/add-two", headers={"Authorization": f"Bearer {key}"}, timeout=30)
