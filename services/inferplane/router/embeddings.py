"""Embeddings through the mesh: validate, encode (batch), embed on an executor, meter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from inferplane.common.errors import InvalidArgument, Unavailable
from inferplane.router import metrics
from inferplane.router.admission import stamp
from inferplane.router.clients import KeyInfo, embed_on
from inferplane.router.engine import GenerationEngine, usage_record
from inferplane.router.replicas import RETRIES, replica_fault
from inferplane.v1 import common_pb2


@dataclass(slots=True)
class EmbedResult:
    vectors: list[list[float]]
    prompt_tokens: int
    cost_nanodollars: int | None = None


async def embed(engine: GenerationEngine, model_id: str, inputs: list[str], *, key: KeyInfo, request_id: str,
                deadline: float | None = None) -> EmbedResult:
    model = engine.model(model_id)
    if not model.is_embedding:
        raise InvalidArgument(f"The model `{model.id}` does not support embeddings.", param="model")
    if not inputs:
        raise InvalidArgument("'input' must contain at least one string.", param="input")
    if len(inputs) > model.max_batch_inputs:
        raise InvalidArgument(f"'input' has {len(inputs)} items; at most {model.max_batch_inputs} are allowed "
                              "per request.", param="input")
    for i, text in enumerate(inputs):
        if not text:
            raise InvalidArgument(f"'input[{i}]' must be a non-empty string.", param="input")
    started = time.monotonic()
    created_at = Timestamp()
    created_at.GetCurrentTime()
    end = min(deadline or float("inf"), started + (model.request_timeout_s or engine.request_timeout_s))
    span = trace.get_current_span()
    span.set_attributes({"gen_ai.operation.name": "embeddings", "gen_ai.request.model": model.id,
                         "inferplane.request_id": request_id, "inferplane.key_id": key.key_id})

    def left() -> float:
        return max(0.001, end - time.monotonic())

    encoded = await engine.tokenizer.encode_batch(model.id, inputs, add_special_tokens=True, timeout=left())
    for i, ids in enumerate(encoded):  # checked before any work is queued on the executor
        if len(ids) > model.context_length:
            raise InvalidArgument(f"'input[{i}]' has {len(ids)} tokens; this model's maximum is "
                                  f"{model.context_length}.", param="input")
    prompt_tokens = sum(len(ids) for ids in encoded)
    ticket = None
    if engine.admission is not None:  # rate limits and budget before the executor works
        ticket = await engine.admission.admit(key, model, prompt_tokens, 0, request_id=request_id)
    gate = engine.capacity.gate(model.id)  # the model's bounded queue (Overloaded when full or too slow)
    try:
        await gate.acquire(left())
        try:
            vectors = await _embed_with_retry(engine, model.triton_model, encoded, request_id=request_id, left=left)
        finally:
            gate.release()
    except BaseException:
        if ticket is not None and engine.admission is not None:
            await engine.admission.release(ticket)  # nothing ran: no usage record will settle it
        raise
    span.set_attributes({"gen_ai.usage.input_tokens": prompt_tokens, "gen_ai.usage.output_tokens": 0})
    metrics.observe(model.id, "embeddings", "stop", prompt_tokens=prompt_tokens, completion_tokens=0, ttft_s=None,
                    duration_s=time.monotonic() - started, last_token_s=None)
    record = usage_record(request_id, key, model.id, prompt_tokens, 0, common_pb2.FINISH_REASON_STOP, started, None,
                          created_at)
    cost = None
    if ticket is not None and engine.admission is not None:
        cost = engine.admission.settle(ticket, prompt_tokens, 0)
        stamp(record, ticket, cost)
        cost = cost if ticket.price is not None else None
    await asyncio.shield(engine.record_soon(record))  # stored even if the caller leaves now
    return EmbedResult(vectors, prompt_tokens, cost)


async def _embed_with_retry(engine: GenerationEngine, triton_model: str, encoded: list[list[int]], *,
                            request_id: str, left: Callable[[], float]) -> list[list[float]]:
    """Embed on one replica; a replica fault is retried once elsewhere, within the retry budget."""
    tried: set[str] = set()
    engine.executors.budget.on_request()
    while True:
        replica = engine.executors.pick(triton_model, exclude=tried)
        trace.get_current_span().set_attribute("inferplane.executor", replica.address)
        replica.outstanding += 1
        try:
            vectors = await embed_on(replica.stub, triton_model, encoded, request_id=request_id, timeout=left())
            replica.succeeded()
            return vectors
        except grpc.aio.AioRpcError as exc:
            if not replica_fault(exc):
                raise
            engine.executors.failed(replica, exc)
            if tried or not engine.executors.budget.try_spend():
                raise Unavailable(f"executor {replica.address} failed: {exc.code().name}") from exc
            tried.add(replica.address)
            RETRIES.inc()
        finally:
            replica.outstanding -= 1
