"""KServe v2 HTTP bodies ↔ gRPC messages (``gateway/kserve_protocol.py``), against tritonclient's own encoders.

Every datatype's JSON ``data`` must become the bytes ``tritonclient`` itself would put in ``raw_input_contents``
(numpy little-endian, BYTES as ``serialize_byte_tensor`` lays them out), and an answer must read back through
``tritonclient.http.InferResult`` as the arrays that went in, binary or JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import serialize_byte_tensor

from inferplane.gateway.errors import GatewayError
from inferplane.gateway.kserve_protocol import InferCall, infer_call, infer_response

ARRAYS = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], dtype=np.uint8),
    "INT16": np.array([[-32768, 0, 32767]], dtype=np.int16),
    "UINT64": np.array([[0, 2**63, 2**64 - 1]], dtype=np.uint64),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[0.5, -2.0, 65504.0]], dtype=np.float16),
    "FP32": np.array([[1.5, -0.25, 3.0e38]], dtype=np.float32),
    "FP64": np.array([[1e-300, -2.5, 1e300]], dtype=np.float64),
    "BYTES": np.array([["héllo", "", "wörld"]], dtype=np.object_),
}


def _body(name: str, array: np.ndarray, datatype: str, *, binary: bool, **kw: Any) -> tuple[bytes, str | None]:
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    body, size = httpclient.InferenceServerClient.generate_request_body([tensor], **kw)
    return body, None if size is None else str(size)


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        serialized = serialize_byte_tensor(array)
        assert serialized is not None
        return bytes(serialized.item())
    return array.tobytes()


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("datatype", list(ARRAYS))
def test_each_datatype_becomes_the_raw_bytes_tritonclient_sends(datatype: str, binary: bool) -> None:
    array = ARRAYS[datatype]
    body, length = _body("x", array, datatype, binary=binary)
    call = infer_call(body, length, model="m")
    (tensor,) = call.request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("x", datatype, [1, 3])
    assert "binary_data_size" not in tensor.parameters  # the edge's, not Triton's
    assert call.request.raw_input_contents == [_raw(array, datatype)]


@pytest.mark.parametrize("datatype", list(ARRAYS))
def test_answers_read_back_through_tritonclient_binary_or_json(datatype: str) -> None:
    array = ARRAYS[datatype]
    resp = service_pb2.ModelInferResponse(model_name="m", model_version="1", id="r1")
    for name in ("as_binary", "as_json"):
        resp.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        resp.raw_output_contents.append(_raw(array, datatype))
    body, length = infer_response(resp, InferCall(service_pb2.ModelInferRequest(), binary_outputs={
        "as_binary": True, "as_json": False}))
    assert length is not None
    result = httpclient.InferResult.from_response_body(body, header_length=length)
    for name in ("as_binary", "as_json"):
        got = result.as_numpy(name)
        assert got is not None
        if datatype == "BYTES":
            assert [v.decode() if isinstance(v, bytes) else v for v in got.reshape(-1)] == list(array.reshape(-1))
        else:
            np.testing.assert_array_equal(got, array)
    assert result.get_response()["id"] == "r1"


def test_parameters_are_forwarded_but_the_binary_switches_are_not() -> None:
    tensor = httpclient.InferInput("x", [1, 2], "INT32")
    tensor.set_data_from_numpy(np.array([[1, 2]], dtype=np.int32))
    out = httpclient.InferRequestedOutput("y", binary_data=False, class_count=3)
    body, size = httpclient.InferenceServerClient.generate_request_body(
        [tensor], outputs=[out], request_id="abc", priority=2, timeout=1000, parameters={"mine": "yes"})
    call = infer_call(body, str(size), model="m", version="3")
    req = call.request
    assert (req.model_name, req.model_version, req.id) == ("m", "3", "abc")
    assert req.parameters["priority"].int64_param == 2 and req.parameters["timeout"].int64_param == 1000
    assert req.parameters["mine"].string_param == "yes"
    assert req.outputs[0].parameters["classification"].int64_param == 3
    assert "binary_data" not in req.outputs[0].parameters and not call.binary("y")
    # no outputs named: tritonclient asks for every output in binary, a request-wide switch
    body, size = httpclient.InferenceServerClient.generate_request_body([tensor])
    call = infer_call(body, None if size is None else str(size), model="m")
    assert call.binary("anything") and "binary_data_output" not in call.request.parameters


_CUT = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "parameters": {"binary_data_size": 4}}]}'


@pytest.mark.parametrize(("body", "length", "needle"), [
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "INT32", "data": [1]}]}', None, "has 1 elements"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [1.5]}]}', None, "integer"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [300]}]}', None, "does not fit"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BF16", "data": [1.0]}]}', None, "binary data"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT4", "data": [1]}]}', None, "datatype"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [1], "colour": 1}]}', None,
     "Unknown parameter: 'inputs[0].colour'"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [1]}], "extra": 1}', None,
     "Unknown parameter: 'extra'"),
    (_CUT + b"12", str(len(_CUT)), "past the end"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP16", "data": [70000.0]}]}', None, "does not fit"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', None, "finite"),
    (b'{"inputs": []}', None, "non-empty"),
    (b'not json', None, "JSON"),
    (b'{"inputs": []}', "99", "Inference-Header-Content-Length"),
])
def test_bad_bodies_are_400_naming_what_is_wrong(body: bytes, length: str | None, needle: str) -> None:
    with pytest.raises(GatewayError) as caught:
        infer_call(body, length, model="m")
    assert caught.value.status == 400 and needle in caught.value.message, caught.value.message


def test_a_bytes_output_that_is_not_text_must_be_asked_for_as_binary() -> None:
    resp = service_pb2.ModelInferResponse(model_name="m")
    resp.outputs.add(name="y", datatype="BYTES", shape=[1])
    resp.raw_output_contents.append(b"\x02\x00\x00\x00\xff\xfe")
    with pytest.raises(GatewayError) as caught:
        infer_response(resp, InferCall(service_pb2.ModelInferRequest()))
    assert caught.value.status == 400 and "binary_data" in caught.value.message
    body, length = infer_response(resp, InferCall(service_pb2.ModelInferRequest(), binary_default=True))
    got = httpclient.InferResult.from_response_body(body, header_length=length).as_numpy("y")
    assert got is not None and got.reshape(-1).tolist() == [b"\xff\xfe"]
