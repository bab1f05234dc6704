"""The step backend's wire format without a Triton: the open request it writes, a frame built as Triton sends it
(real protobuf, raw little-endian columns) dispatched in one go, error codes mapped by code, no Triton reachable.

The behaviour against a real tritonserver is ``tests/integration/test_triton_channel.py``'s.
"""

from __future__ import annotations

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from tritonclient.grpc import service_pb2

from inferplane.common.errors import InvalidArgument, Unavailable
from inferplane.common.ports import free_port
from inferplane.executor.triton_channel import ATTACH_ID, TritonStepBackend, _bytes_tensor, _strings
from inferplane.executor.triton_client import GenerateParams
from inferplane.modeling.contract import LLM, LLMChannel
from tests.channel_sink import RecordingSink


def frame(columns: list[tuple[str, str, bytes, int]]) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name="m", id=ATTACH_ID)
    for name, datatype, raw, n in columns:
        out = response.outputs.add()
        out.name, out.datatype = name, datatype
        out.shape.append(n)
        response.raw_output_contents.append(raw)
    return response


def i64(values: list[int]) -> bytes:
    return np.asarray(values, dtype="<i8").tobytes()


def i32(values: list[int]) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


def test_bytes_columns_round_trip() -> None:
    values = ["stop", "", "length", "ünïcode"]
    assert _strings(_bytes_tensor(values)) == values


async def test_the_open_request_carries_the_channel_seq_and_the_generation() -> None:
    backend, sink = TritonStepBackend(f"127.0.0.1:{free_port()}"), RecordingSink()  # nothing listens there
    try:
        backend.open("k", "m", GenerateParams([5, 6, 7], 9, temperature=0.5), "r", sink)
        stream = backend._streams["m"]
        request = stream.live[0].request
        inputs = {t.name: raw for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)}
        assert _strings(inputs[LLMChannel.CHANNEL.name]) == [stream.channel_id]
        assert np.frombuffer(inputs[LLMChannel.SEQ.name], "<i8").tolist() == [0]
        assert np.frombuffer(inputs[LLM.INPUT_IDS.name], "<i8").tolist() == [5, 6, 7]
        assert np.frombuffer(inputs[LLM.MAX_TOKENS.name], "<i4").tolist() == [9]
        assert request.id == "0" and request.model_name == "m"
        await sink.wait_ended(["k"], timeout=15)
    finally:
        await backend.close()
    assert isinstance(sink.ended["k"].error, Unavailable), "no Triton there: the sequence fails, UNAVAILABLE"


@pytest.mark.parametrize(("sampler", "sent"), [(ALWAYS_ON, True), (ALWAYS_OFF, False)])
async def test_traceparent_only_when_the_span_is_sampled(sampler: object, sent: bool) -> None:
    tracer = TracerProvider(sampler=sampler).get_tracer(__name__)  # type: ignore[arg-type]
    backend, sink = TritonStepBackend(f"127.0.0.1:{free_port()}"), RecordingSink()
    try:
        with tracer.start_as_current_span("generate"):
            backend.open("k", "m", GenerateParams([5], 1), "r", sink)
        parameters = backend._streams["m"].live[0].request.parameters
        assert (LLMChannel.TRACEPARENT in parameters) is sent
        if sent:
            assert parameters[LLMChannel.TRACEPARENT].string_param.startswith("00-")
    finally:
        await backend.close()


async def test_a_frame_reaches_every_sink_in_one_go_tokens_then_ends() -> None:
    backend, sink = TritonStepBackend(f"127.0.0.1:{free_port()}"), RecordingSink()
    try:
        for key in ("a", "b", "c", "d"):
            backend.open(key, "m", GenerateParams([5], 4), key, sink)
        stream = backend._streams["m"]
        stream._dispatch(frame([
            (LLMChannel.SEQS.name, "INT64", i64([0, 1, 2, 99]), 4),  # 99: no such sequence (ignored)
            (LLMChannel.COUNTS.name, "INT32", i32([2, 1, 1, 1]), 4),
            (LLM.TOKEN_IDS.name, "INT64", i64([10, 11, 20, 30, 990]), 5),
            (LLM.LOGPROBS.name, "FP32", np.asarray([-1, -2, -3, -4, -9], "<f4").tobytes(), 5),
            (LLMChannel.ENDED.name, "INT64", i64([1]), 1),
            (LLMChannel.ENDED_REASONS.name, "BYTES", _bytes_tensor(["stop"]), 1),
            (LLMChannel.ENDED_PROMPT_TOKENS.name, "INT32", i32([1]), 1),
            (LLMChannel.ENDED_COMPLETION_TOKENS.name, "INT32", i32([2]), 1),
            (LLMChannel.FAILED.name, "INT64", i64([2, 3]), 2),
            (LLMChannel.FAILED_CODES.name, "BYTES", _bytes_tensor(["INVALID_ARG", "INTERNAL"]), 2),
            (LLMChannel.FAILED_MESSAGES.name, "BYTES", _bytes_tensor(["top_p must be in (0, 1]", "boom"]), 2),
        ]))
        assert sink.tokens_of == {"a": [10, 11], "b": [20], "c": [30]}
        assert sink.logprobs_of["a"] == [-1.0, -2.0]
        assert (sink.ended["b"].reason, sink.ended["b"].prompt_tokens, sink.ended["b"].completion_tokens) == (
            "stop", 1, 2)
        assert isinstance(sink.ended["c"].error, InvalidArgument) and "top_p" in str(sink.ended["c"].error)
        assert isinstance(sink.ended["d"].error, Unavailable), "INTERNAL: another replica may serve it"
        assert sink.frames == 0  # nothing flushed yet: the whole frame was delivered without yielding
        assert set(stream.live) == {0} and set(backend._where) == {"a"}
        backend.cancel("b")  # ended: a no-op
        assert stream.cancels == []
        backend.cancel("a")
        assert stream.cancels == [0]
    finally:
        await backend.close()
    assert sink.frames >= 1 and isinstance(sink.ended["a"].error, Unavailable)
