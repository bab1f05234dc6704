"""The executor's own Triton protobuf (build_request / parse_response) says what tritonclient's would."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import serialize_byte_tensor

from services.executor.triton_client import GenerateParams, build_inputs, build_request, parse_response

PARAMS = [
    GenerateParams([1, 2, 3], 16),
    GenerateParams([5] * 300, 1, temperature=0.7, top_p=0.9, top_k=40, seed=2**40 + 3, stop_token_ids=[7, 8]),
]


@pytest.mark.parametrize("params", PARAMS)
def test_request_tensors_match_tritonclients(params: GenerateParams) -> None:
    req = build_request("tiny-llama", params, "rid-1")
    assert (req.model_name, req.id) == ("tiny-llama", "rid-1")
    theirs = build_inputs(params)
    assert [t.name for t in req.inputs] == [t.name() for t in theirs]
    for mine, raw, their in zip(req.inputs, req.raw_input_contents, theirs, strict=True):
        assert mine.datatype == their.datatype()
        assert list(mine.shape) == their.shape()
        assert raw == their._get_content()


def response(**outputs: np.ndarray) -> service_pb2.ModelInferResponse:
    resp = service_pb2.ModelInferResponse(model_name="tiny-llama")
    kinds = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}
    for name, values in outputs.items():
        out = resp.outputs.add()
        out.name = name
        out.shape.extend(values.shape)
        if values.dtype == np.object_:
            out.datatype = "BYTES"
            serialized = serialize_byte_tensor(values)
            assert serialized is not None
            resp.raw_output_contents.append(serialized.item())
        else:
            out.datatype = kinds[values.dtype]
            resp.raw_output_contents.append(values.tobytes())
    return resp


def test_token_and_final_responses_parse_as_tritonclient_reads_them() -> None:
    token = response(token_ids=np.array([11, 12, 4095], dtype=np.int64), logprobs=np.zeros(3, dtype=np.float32))
    chunk = parse_response(token)
    assert chunk.token_ids == InferResult(token).as_numpy("token_ids").tolist() == [11, 12, 4095]
    assert chunk.finish_reason is None
    final = response(token_ids=np.zeros([0], dtype=np.int64), logprobs=np.zeros([0], dtype=np.float32),
                     finish_reason=np.array([b"length"], dtype=np.object_),
                     prompt_tokens=np.array([42], dtype=np.int32), completion_tokens=np.array([16], dtype=np.int32))
    last = parse_response(final)
    theirs = InferResult(final)
    assert (last.token_ids, last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
        [], theirs.as_numpy("finish_reason")[0].decode(), int(theirs.as_numpy("prompt_tokens")[0]),
        int(theirs.as_numpy("completion_tokens")[0]))
    assert last.finish_reason == "length" and last.prompt_tokens == 42
