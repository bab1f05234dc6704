"""The executor's own Triton protobuf (build_request / parse_response) says what tritonclient's would, in the
tensors of ``inferplane.modeling.contract``; Triton's errors are mapped on their status codes."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from inferplane.common.errors import InvalidArgument, NotFound, Unavailable
from inferplane.executor.triton_client import (
    GenerateParams,
    TritonLLMClient,
    _status_code,
    build_inputs,
    build_request,
    parse_response,
    triton_error,
)
from inferplane.modeling.contract import LLM, STREAM_ERRORS_AS_STATUS

PARAMS = [
    GenerateParams([1, 2, 3], 16),
    GenerateParams([5] * 300, 1, temperature=0.7, top_p=0.9, top_k=40, seed=2**40 + 3, stop_token_ids=[7, 8],
                   repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=-0.5, min_tokens=1, ignore_eos=True,
                   logit_bias={5: -3.0, 9: 2.5}, top_logprobs=3, constraint='{"json_object": true}'),
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


def test_request_tensors_are_the_contracts() -> None:
    full = build_request("m", PARAMS[1])
    assert [(t.name, t.datatype) for t in full.inputs] == [(s.name, s.datatype) for s in LLM.INPUTS]
    for tensor in full.inputs:  # a scalar's shape [1], a list's its length
        spec = next(s for s in LLM.INPUTS if s.name == tensor.name)
        assert spec.dims == (-1,) or list(tensor.shape) == list(spec.dims)
    required = [s.name for s in LLM.INPUTS if not s.optional]
    assert [t.name for t in build_request("m", PARAMS[0]).inputs] == required


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

    def __init__(self, responses: list[Any], error: grpc.aio.AioRpcError | None = None) -> None:
        self.responses = list(responses)
        self.error = error  # raised once the responses are read: the stream's status
        self.cancelled = False
        self.written: list[service_pb2.ModelInferRequest] = []

    async def write(self, msg: service_pb2.ModelInferRequest) -> None:
        self.written.append(msg)

    async def done_writing(self) -> None:
        pass

    async def read(self) -> object:
        if not self.responses and self.error is not None:
            raise self.error
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


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize(
    ("code", "expected"),
    [(grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument), (grpc.StatusCode.NOT_FOUND, NotFound),
     (grpc.StatusCode.UNAVAILABLE, Unavailable), (grpc.StatusCode.INTERNAL, Unavailable),
     (grpc.StatusCode.CANCELLED, Unavailable), (None, Unavailable)],
)
def test_errors_map_on_the_status_code_not_the_text(code: grpc.StatusCode | None, expected: type) -> None:
    # the text says "invalid" and "unknown model ... not found": only the code decides
    err = triton_error(code, "invalid: Request for unknown model: 'x' is not found", "x")
    assert type(err) is expected
    exc = InferenceServerException("boom", status=str(code) if code is not None else None)
    assert _status_code(exc) == code


class FakeStub:
    """Triton's stub for one generation: the stream, and ModelMetadata's answer (None = the model exists)."""

    def __init__(self, call: FakeCall, metadata_error: grpc.StatusCode | None = None) -> None:
        self.call, self.metadata_error = call, metadata_error
        self.stream_metadata: Any = None

    def ModelStreamInfer(self, metadata: Any = None) -> FakeCall:
        self.stream_metadata = metadata
        return self.call

    async def ModelMetadata(self, request: Any, timeout: float | None = None) -> Any:
        if self.metadata_error is not None:
            raise rpc_error(self.metadata_error, f"Request for unknown model: '{request.name}' is not found")
        return service_pb2.ModelMetadataResponse(name=request.name)


async def generate_with(stub: FakeStub) -> list[Any]:
    client = TritonLLMClient("127.0.0.1:1")
    client._stub = stub  # type: ignore[assignment]
    try:
        return [c async for c in client.generate("tiny-llama", PARAMS[0])]
    finally:
        await client.close()


async def test_a_refusal_ends_the_stream_with_its_status() -> None:
    stub = FakeStub(FakeCall([], rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]")))
    with pytest.raises(InvalidArgument, match="top_p must be in"):
        await generate_with(stub)
    assert STREAM_ERRORS_AS_STATUS in stub.stream_metadata, "the stream asks for errors as gRPC status"
    with pytest.raises(Unavailable):
        await generate_with(FakeStub(FakeCall([], rpc_error(grpc.StatusCode.INTERNAL, "scheduler step failed"))))


@pytest.mark.parametrize(("metadata_error", "expected"), [(grpc.StatusCode.NOT_FOUND, NotFound), (None, Unavailable)])
async def test_an_error_message_without_status_takes_the_models_metadata_status(
    metadata_error: grpc.StatusCode | None, expected: type,
) -> None:
    # Triton answers a request it cannot start (an unknown model) with a message on an OK stream
    message = service_pb2.ModelStreamInferResponse(error_message="Request for unknown model: 'x' is not found")
    with pytest.raises(expected):
        await generate_with(FakeStub(FakeCall([message]), metadata_error))
