"""``tritonclient`` unmodified against the edge that ``inferplane up`` starts: any Triton model, with the key.

``minilm-raw`` (task ``infer``, $0.000001 a request) is the embedding's Triton model itself. ``tritonclient.grpc``
and ``tritonclient.http`` (binary tensor data on, as it defaults to) call ``infer`` at Envoy's port; each answer
equals the same call made straight to Triton, and each leaves one usage record at the per-request price (read back
through ``GET /v1/usage``). Without a key: UNAUTHENTICATED / 401; an unknown model: NOT_FOUND / 404.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from inferplane.cli.launcher import LocalStack

pytestmark = pytest.mark.e2e
MODEL, TRITON_MODEL = "minilm-raw", "all-minilm-l6-v2"
PER_REQUEST = Decimal("0.000001")
IDS = np.array([[101, 7592, 2088, 102]], dtype=np.int64)  # [CLS] hello world [SEP]


def inputs(module: Any) -> list[Any]:
    out = []
    for name, array in (("input_ids", IDS), ("attention_mask", np.ones_like(IDS))):
        tensor = module.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)  # tritonclient.http: binary data, its default
        out.append(tensor)
    return out


def edge_host(stack: LocalStack) -> str:
    return stack.base_url.removesuffix("/v1").removeprefix("http://")


def billed(stack: LocalStack, key: str) -> tuple[int, Decimal]:
    """The key's requests and cost for ``MODEL`` so far (``GET /v1/usage``)."""
    resp = httpx.get(f"{stack.base_url}/usage", headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    rows = [r for r in resp.json()["data"] if r["model"] == MODEL]
    return sum(r["requests"] for r in rows), sum((Decimal(r["cost"]) for r in rows), Decimal(0))


def test_tritonclient_grpc_and_http_infer_through_the_edge_billed_per_request(stack: LocalStack,
                                                                               api_key: str) -> None:
    auth = {"authorization": f"Bearer {api_key}"}
    direct = grpcclient.InferenceServerClient(f"127.0.0.1:{stack.ports['triton_grpc']}")
    want = direct.infer(TRITON_MODEL, inputs(grpcclient)).as_numpy("embedding")
    assert want is not None and want.shape == (1, 384)
    requests_before, cost_before = billed(stack, api_key)

    over_grpc = grpcclient.InferenceServerClient(stack.grpc_addr)  # Envoy's port: the router behind it
    got = over_grpc.infer(MODEL, inputs(grpcclient), headers=auth)
    np.testing.assert_array_equal(got.as_numpy("embedding"), want)
    assert over_grpc.get_model_metadata(MODEL, headers=auth).name == MODEL
    assert over_grpc.is_model_ready(MODEL, headers=auth)

    over_http = httpclient.InferenceServerClient(edge_host(stack))
    result = over_http.infer(MODEL, inputs(httpclient), headers=dict(auth))  # it writes into the dict it is given
    np.testing.assert_array_equal(result.as_numpy("embedding"), want)
    assert result.get_response()["model_name"] == MODEL
    assert over_http.get_model_metadata(MODEL, headers=auth)["inputs"][0]["name"] == "input_ids"
    assert over_http.is_model_ready(MODEL, headers=auth)

    deadline = time.monotonic() + 30  # records reach metering through the router's outbox
    while billed(stack, api_key)[0] < requests_before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    requests_after, cost_after = billed(stack, api_key)
    assert requests_after - requests_before == 2  # one record per inference; metadata and readiness are free
    assert cost_after - cost_before == 2 * PER_REQUEST


def test_no_key_and_unknown_models_are_refused_through_the_edge(stack: LocalStack, api_key: str) -> None:
    auth = {"authorization": f"Bearer {api_key}"}
    over_grpc = grpcclient.InferenceServerClient(stack.grpc_addr)
    over_http = httpclient.InferenceServerClient(edge_host(stack))
    cases = [(over_grpc, grpcclient, {}, MODEL, "StatusCode.UNAUTHENTICATED"),
             (over_grpc, grpcclient, auth, "no-such-model", "StatusCode.NOT_FOUND"),
             (over_http, httpclient, {}, MODEL, "401"),
             (over_http, httpclient, auth, "no-such-model", "404")]
    for client, module, headers, model, status in cases:
        with pytest.raises(InferenceServerException) as caught:
            client.infer(model, inputs(module), headers=dict(headers))
        assert caught.value.status() == status, caught.value
