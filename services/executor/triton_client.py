"""Executor API → Triton's KServe v2 gRPC streaming API (decoupled LLM model).

The contract with the model (services/executor/triton_models/llm): inputs ``input_ids``, ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop_token_ids``; one response per token with
``token_ids`` (+ ``logprobs``); a final response with ``finish_reason``, ``prompt_tokens`` and
``completion_tokens``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from opentelemetry import propagate
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from services.common.errors import InvalidArgument, NotFound, Unavailable

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


@dataclass(slots=True)
class TritonChunk:
    """One Triton response: new token ids, or the final summary."""

    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _input(name: str, array: np.ndarray, dtype: str) -> InferInput:
    tensor = InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def build_inputs(params: GenerateParams) -> list[InferInput]:
    inputs = [
        _input("input_ids", np.asarray(params.prompt_token_ids, dtype=np.int64), "INT64"),
        _input("max_tokens", np.asarray([params.max_tokens], dtype=np.int32), "INT32"),
    ]
    if params.temperature is not None:
        inputs.append(_input("temperature", np.asarray([params.temperature], dtype=np.float32), "FP32"))
    if params.top_p is not None:
        inputs.append(_input("top_p", np.asarray([params.top_p], dtype=np.float32), "FP32"))
    if params.top_k is not None:
        inputs.append(_input("top_k", np.asarray([params.top_k], dtype=np.int32), "INT32"))
    if params.seed is not None:
        inputs.append(_input("seed", np.asarray([params.seed], dtype=np.int64), "INT64"))
    if params.stop_token_ids:
        inputs.append(_input("stop_token_ids", np.asarray(params.stop_token_ids, dtype=np.int64), "INT64"))
    return inputs


def _triton_error(exc: InferenceServerException | Exception, model: str) -> Exception:
    text = str(exc.message() if isinstance(exc, InferenceServerException) else exc)
    status = exc.status() if isinstance(exc, InferenceServerException) else None
    lowered = text.lower()
    if "unknown model" in lowered or ("model" in lowered and "not found" in lowered):
        return NotFound(f"model {model!r} is not loaded on this executor")
    if status in ("StatusCode.INVALID_ARGUMENT", "INVALID_ARG") or "invalid" in lowered:
        return InvalidArgument(text)
    return Unavailable(f"triton: {text}")


class TritonLLMClient:
    """A connection to one Triton server; one bidi stream per generation (cancel = cancel the stream)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = triton_aio.InferenceServerClient(url)

    async def close(self) -> None:
        await self._client.close()

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

        async def one(ids: list[int]) -> list[float]:
            array = np.asarray([ids], dtype=np.int64)  # [1, S]
            tensors = [_input("input_ids", array, "INT64"),
                       _input("attention_mask", np.ones_like(array), "INT64")]
            try:
                result = await self._client.infer(model, tensors, request_id=request_id, headers=carrier or None)
            except InferenceServerException as exc:
                raise _triton_error(exc, model) from exc
            out = result.as_numpy("embedding")
            if out is None:
                raise Unavailable(f"{model!r} returned no 'embedding' output")
            return [float(x) for x in out.reshape(-1)]

        return list(await asyncio.gather(*(one(ids) for ids in inputs)))

    async def generate(self, model: str, params: GenerateParams, *, request_id: str = "") -> AsyncIterator[TritonChunk]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # traceparent: Triton's own spans join the caller's trace

        async def requests() -> AsyncIterator[dict[str, object]]:
            yield {"model_name": model, "inputs": build_inputs(params), "request_id": request_id}

        stream = self._client.stream_infer(requests(), headers=carrier or None)
        try:
            async for result, error in stream:
                if error is not None:
                    raise _triton_error(error, model)
                assert result is not None
                ids = result.as_numpy("token_ids")
                chunk = TritonChunk(token_ids=[] if ids is None else ids.astype(np.int64).tolist())
                reason = result.as_numpy("finish_reason")
                if reason is not None:
                    chunk.finish_reason = reason.reshape(-1)[0].decode()
                    chunk.prompt_tokens = int(result.as_numpy("prompt_tokens").reshape(-1)[0])
                    chunk.completion_tokens = int(result.as_numpy("completion_tokens").reshape(-1)[0])
                    yield chunk
                    return
                yield chunk
            raise Unavailable(f"triton ended the stream of {model!r} without a final response")
        except InferenceServerException as exc:
            raise _triton_error(exc, model) from exc
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"model {model!r} is not loaded on this executor") from exc
            raise Unavailable(f"triton: {exc.code().name}: {exc.details()}") from exc
        finally:
            stream.cancel()  # no-op after a normal end; cancels the Triton request when the caller left
