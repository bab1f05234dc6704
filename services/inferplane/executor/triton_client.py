"""Executor API → Triton's KServe v2 gRPC API: the decoupled LLM model (streaming) and the embedding model.

The tensors are ``inferplane.modeling.contract``'s (``LLM``, ``Embedding``), the same module the Triton models
read them from. Errors are mapped on status codes, never on message text: a generation stream is opened with
``contract.STREAM_ERRORS_AS_STATUS``, so that Triton ends it with the gRPC status of the model's
``TritonError`` code (INVALID_ARG -> INVALID_ARGUMENT ...) instead of an error message on an OK stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from opentelemetry import propagate
from tritonclient.grpc import InferInput, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from inferplane.common.errors import InferplaneError, InvalidArgument, NotFound, Unavailable
from inferplane.common.tasks import spawn
from inferplane.executor import trace_links
from inferplane.modeling.contract import LLM, NUMPY_DTYPES, STREAM_ERRORS_AS_STATUS, Embedding

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GenerateParams:
    """What one generation asks of the model (plain Python, no protobuf)."""

    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_logprobs: int = 0
    constraint: str | None = None  # the grammar spec, JSON (contract ``LLM.CONSTRAINT``)


@dataclass(slots=True)
class TritonChunk:
    """One Triton response: new token ids (with their log-probabilities), or the final summary."""

    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those reused from the model's prefix cache
    logprobs: list[float] = field(default_factory=list)
    top_k: int = 0  # alternatives per token in top_ids / top_logprobs
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)

    def extend(self, other: TritonChunk) -> None:
        """Append ``other``'s tokens (and their log-probabilities) to this chunk's."""
        self.token_ids.extend(other.token_ids)
        self.logprobs.extend(other.logprobs)
        if other.top_k:
            self.top_k = other.top_k
            self.top_ids.extend(other.top_ids)
            self.top_logprobs.extend(other.top_logprobs)


def _input(name: str, array: np.ndarray, dtype: str) -> InferInput:
    tensor = InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


# (name, KServe datatype, numpy dtype) of each LLM input, resolved once: built for every generation
_INPUTS = {spec.name: (spec.name, spec.datatype, np.dtype(spec.numpy_dtype)) for spec in LLM.INPUTS}
_OPTIONAL_SCALARS = tuple((_INPUTS[spec.name], spec.name) for spec in (
    LLM.TEMPERATURE, LLM.TOP_P, LLM.TOP_K, LLM.SEED, LLM.REPETITION_PENALTY, LLM.PRESENCE_PENALTY,
    LLM.FREQUENCY_PENALTY, LLM.MIN_TOKENS))
assert {name for _, name in _OPTIONAL_SCALARS} <= set(GenerateParams.__dataclass_fields__), "fields named as inputs"
_INPUT_IDS, _MAX_TOKENS = _INPUTS[LLM.INPUT_IDS.name], _INPUTS[LLM.MAX_TOKENS.name]
_STOP_TOKEN_IDS = _INPUTS[LLM.STOP_TOKEN_IDS.name]
_ORDER = {spec.name: i for i, spec in enumerate(LLM.INPUTS)}


def request_tensors(params: GenerateParams) -> list[tuple[str, str, np.ndarray]]:
    """The LLM's input tensors for ``params`` (optional ones only when set): (name, datatype, little-endian array)."""
    tensors = [(_INPUT_IDS[0], _INPUT_IDS[1], np.asarray(params.prompt_token_ids, dtype=_INPUT_IDS[2])),
               (_MAX_TOKENS[0], _MAX_TOKENS[1], np.asarray([params.max_tokens], dtype=_MAX_TOKENS[2]))]
    for (name, datatype, dtype), field_name in _OPTIONAL_SCALARS:
        value = getattr(params, field_name)
        if value is not None:
            tensors.append((name, datatype, np.asarray([value], dtype=dtype)))
    if params.stop_token_ids:
        name, datatype, dtype = _STOP_TOKEN_IDS
        tensors.append((name, datatype, np.asarray(params.stop_token_ids, dtype=dtype)))
    if params.ignore_eos:
        tensors.append(_tensor(LLM.IGNORE_EOS, [1]))
    if params.top_logprobs:
        tensors.append(_tensor(LLM.TOP_LOGPROBS, [params.top_logprobs]))
    if params.logit_bias:
        tensors.append(_tensor(LLM.LOGIT_BIAS_IDS, list(params.logit_bias)))
        tensors.append(_tensor(LLM.LOGIT_BIAS, list(params.logit_bias.values())))
    if params.constraint is not None:
        tensors.append((LLM.CONSTRAINT.name, LLM.CONSTRAINT.datatype,
                        np.array([params.constraint.encode()], dtype=np.object_)))
    tensors.sort(key=lambda t: _ORDER[t[0]])  # in the contract's order
    return tensors


def _tensor(spec: Any, values: list[Any]) -> tuple[str, str, np.ndarray]:
    name, datatype, dtype = _INPUTS[spec.name]
    return name, datatype, np.asarray(values, dtype=dtype)


def build_inputs(params: GenerateParams) -> list[InferInput]:
    """``request_tensors`` as tritonclient's ``InferInput`` (for benchmarks and tests that use tritonclient)."""
    return [_input(name, array, datatype) for name, datatype, array in request_tensors(params)]


def build_request(model: str, params: GenerateParams, request_id: str = "") -> service_pb2.ModelInferRequest:
    """The same tensors as ``build_inputs``, straight into Triton's protobuf (raw little-endian contents)."""
    req = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, datatype, array in request_tensors(params):
        tensor = req.inputs.add()
        tensor.name, tensor.datatype = name, datatype
        tensor.shape.extend(array.shape)
        if datatype == "BYTES":  # KServe's raw BYTES: each item as a 4-byte little-endian length, then its bytes
            req.raw_input_contents.append(b"".join(len(x).to_bytes(4, "little") + x for x in array.reshape(-1)))
        else:
            req.raw_input_contents.append(array.tobytes())
    return req


# The output names, bound once: parse_response runs for every streamed response.
_TOKEN_IDS, _FINISH_REASON, _LOGPROBS = LLM.TOKEN_IDS.name, LLM.FINISH_REASON.name, LLM.LOGPROBS.name
_TOP_IDS, _TOP_VALUES = LLM.TOP_TOKEN_IDS.name, LLM.TOP_LOGPROB_VALUES.name
_PROMPT_TOKENS, _COMPLETION_TOKENS, _CACHED_TOKENS = (LLM.PROMPT_TOKENS.name, LLM.COMPLETION_TOKENS.name,
                                                      LLM.CACHED_TOKENS.name)
_INTS = {datatype: NUMPY_DTYPES[datatype] for datatype in ("INT64", "INT32")}


def parse_response(resp: service_pb2.ModelInferResponse) -> TritonChunk:
    """One streamed LLM response (the contract's ``LLM.OUTPUTS``) without tritonclient's InferResult wrapping."""
    chunk = TritonChunk(token_ids=[])
    for out, raw in zip(resp.outputs, resp.raw_output_contents, strict=False):
        if out.name == _TOKEN_IDS:
            chunk.token_ids = np.frombuffer(raw, dtype=_INTS[out.datatype]).tolist()
        elif out.name == _LOGPROBS:
            chunk.logprobs = np.frombuffer(raw, dtype="<f4").tolist()
        elif out.name == _TOP_IDS:
            chunk.top_ids = np.frombuffer(raw, dtype=_INTS[out.datatype]).tolist()
        elif out.name == _TOP_VALUES:
            chunk.top_logprobs = np.frombuffer(raw, dtype="<f4").tolist()
        elif out.name == _FINISH_REASON:  # BYTES: a 4-byte little-endian length, then the bytes
            size = int.from_bytes(raw[:4], "little")
            chunk.finish_reason = raw[4:4 + size].decode()
        elif out.name == _PROMPT_TOKENS:
            chunk.prompt_tokens = int(np.frombuffer(raw, dtype=_INTS[out.datatype])[0])
        elif out.name == _COMPLETION_TOKENS:
            chunk.completion_tokens = int(np.frombuffer(raw, dtype=_INTS[out.datatype])[0])
        elif out.name == _CACHED_TOKENS:
            chunk.cached_tokens = int(np.frombuffer(raw, dtype=_INTS[out.datatype])[0])
    if chunk.top_ids and chunk.token_ids:
        chunk.top_k = len(chunk.top_ids) // len(chunk.token_ids)
    return chunk


async def _read_to_end(call: Any, timeout_s: float = 5.0) -> None:
    """Read a finished stream to its status (Triton closes it at once); cancel it only if that takes too long."""
    try:
        async with asyncio.timeout(timeout_s):
            while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
    except (TimeoutError, grpc.aio.AioRpcError):
        call.cancel()


def triton_error(code: grpc.StatusCode | None, details: str, model: str) -> InferplaneError:
    """The domain error for Triton's gRPC status: the code decides, the text is only passed on.

    INVALID_ARGUMENT: the model (or Triton) refused the request (the models' INVALID_ARG). NOT_FOUND: no such
    model on this Triton. Anything else (UNAVAILABLE, INTERNAL from a failed model step, a broken connection, no
    status at all): this executor could not serve it, UNAVAILABLE, which the router may retry elsewhere.
    """
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(details)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"model {model!r} is not loaded on this executor")
    return Unavailable(f"triton: {code.name if code is not None else 'error'}: {details}")


def _status_code(exc: InferenceServerException) -> grpc.StatusCode | None:
    """tritonclient keeps the gRPC status as ``str(StatusCode.X)``; None when the error did not come from gRPC."""
    return grpc.StatusCode.__members__.get(str(exc.status() or "").removeprefix("StatusCode."))


_IDS, _MASK = Embedding.INPUT_IDS, Embedding.ATTENTION_MASK


class TritonLLMClient:
    """A connection to one Triton server; one bidi stream per generation (cancel = cancel the stream)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = triton_aio.InferenceServerClient(url)
        # Generations go straight through Triton's generated stub on a channel of our own: the protobuf is
        # built and read here (build_request / parse_response), not through InferInput / InferResult, which
        # cost more CPU per streamed token than everything else in the executor.
        self._channel = grpc.aio.insecure_channel(url, options=[("grpc.max_send_message_length", 64 << 20),
                                                               ("grpc.max_receive_message_length", 64 << 20)])
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to Triton (the KServe pass-through forwards on it too)."""
        return self._channel

    async def close(self) -> None:
        await self._client.close()
        await self._channel.close(None)

    async def is_ready(self, models: list[str]) -> bool:
        try:
            if not await self._client.is_server_ready():
                return False
            for model in models:
                if not await self._client.is_model_ready(model):
                    return False
            return True
        except InferenceServerException:
            return False

    async def server_version(self) -> str:
        meta = await self._client.get_server_metadata()
        return str(meta.version)

    async def embed(self, model: str, inputs: list[list[int]], *, request_id: str = "") -> list[list[float]]:
        """One Triton request per input, all at once: Triton's dynamic batcher groups them (and other callers')."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        trace_links.remember(request_id)

        async def one(ids: list[int]) -> list[float]:
            array = np.asarray([ids], dtype=_IDS.numpy_dtype)  # [1, S]
            tensors = [_input(_IDS.name, array, _IDS.datatype),
                       _input(_MASK.name, np.ones_like(array), _MASK.datatype)]
            try:
                result = await self._client.infer(model, tensors, request_id=request_id, headers=carrier or None)
            except InferenceServerException as exc:
                raise triton_error(_status_code(exc), str(exc.message()), model) from exc
            out = result.as_numpy(Embedding.EMBEDDING.name)
            if out is None:
                raise Unavailable(f"{model!r} returned no {Embedding.EMBEDDING.name!r} output")
            return [float(x) for x in out.reshape(-1)]

        return list(await asyncio.gather(*(one(ids) for ids in inputs)))

    async def _error_without_status(self, model: str, message: str) -> InferplaneError:
        """A stream's error that came as a message on an OK stream: its status from the model's metadata.

        Triton sends the errors of a request it could not start (an unknown model, above all) that way even with
        STREAM_ERRORS_AS_STATUS. ModelMetadata answers NOT_FOUND for an unknown model; any other failure to
        start is this executor's (UNAVAILABLE).
        """
        try:
            await self._stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=model), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return triton_error(exc.code(), message, model)
        return triton_error(None, message, model)

    async def generate(self, model: str, params: GenerateParams, *, request_id: str = "") -> AsyncIterator[TritonChunk]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # traceparent: Triton's own spans join the caller's trace
        trace_links.remember(request_id)  # ... or are put back into it (trace_links.py)
        # STREAM_ERRORS_AS_STATUS: a refused request ends the stream with its status code (see the docstring)
        call = self._stub.ModelStreamInfer(metadata=(*carrier.items(), STREAM_ERRORS_AS_STATUS))
        finished = False
        try:
            await call.write(build_request(model, params, request_id))
            await call.done_writing()
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:  # type: ignore[attr-defined]
                    break
                if msg.error_message:
                    raise await self._error_without_status(model, msg.error_message)
                chunk = parse_response(msg.infer_response)
                finished = chunk.finish_reason is not None
                yield chunk
                if finished:
                    await _read_to_end(call)
                    return
            raise Unavailable(f"triton ended the stream of {model!r} without a final response")
        except grpc.aio.AioRpcError as exc:
            raise triton_error(exc.code(), exc.details() or "", model) from exc
        finally:
            if not finished:
                call.cancel()  # the caller left (or the stream broke): cancel the Triton request
            elif not call.done():
                # Let a finished stream end by itself: tritonserver leaks ~7 KB for every stream cancelled
                # after its final response (measured: 4,000 such requests grew its RSS by 31 MB, 0 without).
                spawn(_read_to_end(call))
