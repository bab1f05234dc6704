"""The executor's own Triton protobuf (build_request / parse_response) says what tritonclient's would."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import serialize_byte_tensor

from inferplane.executor.triton_client import GenerateParams, build_inputs, build_request, parse_response

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


class FakeCall:
    """Stands in for Triton's ModelStreamInfer call: the test is about when the executor cancels it."""

    def __init__(self, responses: list[service_pb2.ModelStreamInferResponse]) -> None:
        self.responses = list(responses)
        self.cancelled = False
        self.written: list[service_pb2.ModelInferRequest] = []

    async def write(self, msg: service_pb2.ModelInferRequest) -> None:
        self.written.append(msg)

    async def done_writing(self) -> None:
        pass

    async def read(self) -> object:
        import grpc

        return self.responses.pop(0) if self.responses else grpc.aio.EOF  # type: ignore[attr-defined]

    def done(self) -> bool:
        return not self.responses

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def stream_of(*responses: service_pb2.ModelInferResponse) -> list[service_pb2.ModelStreamInferResponse]:
    return [service_pb2.ModelStreamInferResponse(infer_response=r) for r in responses]


async def test_a_finished_stream_is_read_to_its_end_never_cancelled() -> None:
    # tritonserver leaked ~7 KB for every stream cancelled after its final response
    from inferplane.executor.triton_client import TritonLLMClient

    final = response(token_ids=np.zeros([0], dtype=np.int64), finish_reason=np.array([b"stop"], dtype=np.object_),
                     prompt_tokens=np.array([3], dtype=np.int32), completion_tokens=np.array([1], dtype=np.int32))
    client = TritonLLMClient("127.0.0.1:1")
    done = FakeCall(stream_of(response(token_ids=np.array([9], dtype=np.int64)), final))
    client._stub = type("Stub", (), {"ModelStreamInfer": lambda self, metadata=None: done})()  # type: ignore[assignment]
    chunks = [c async for c in client.generate("tiny-llama", PARAMS[0], request_id="r")]
    assert [c.finish_reason for c in chunks] == [None, "stop"]
    assert not done.cancelled and done.written[0].id == "r"

    left = FakeCall(stream_of(*[response(token_ids=np.array([9], dtype=np.int64))] * 5, final))
    client._stub = type("Stub", (), {"ModelStreamInfer": lambda self, metadata=None: left})()  # type: ignore[assignment]
    gen = client.generate("tiny-llama", PARAMS[0])
    await gen.__anext__()
    await gen.aclose()  # the caller left mid-stream: the Triton request is cancelled
    assert left.cancelled
    await client.close()
