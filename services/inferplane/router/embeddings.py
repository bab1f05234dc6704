"""Embeddings through the mesh: validate, encode (batch), embed on an executor, meter."""

from __future__ import annotations

from dataclasses import dataclass

from inferplane.common import wire
from inferplane.common.catalog import CatalogModel
from inferplane.common.errors import InvalidArgument
from inferplane.common.wire import STOP
from inferplane.router import canary
from inferplane.router.clients import KeyInfo, embed_on
from inferplane.router.engine import GenerationEngine
from inferplane.router.lease import trace_request
from inferplane.router.replicas import Replica


@dataclass(slots=True)
class EmbedResult:
    vectors: list[list[float]]
    prompt_tokens: int
    cost_nanodollars: int | None = None


async def embed(engine: GenerationEngine, model_id: str, inputs: list[str], *, key: KeyInfo, request_id: str,
                deadline: float | None = None) -> EmbedResult:
    model = canary.serving(engine.model(model_id), request_id)  # a canary split: the version serving it
    validate_inputs(inputs, model)
    clock = engine.clock(model, deadline)
    trace_request("embeddings", model.id, request_id, key)
    encoded = await engine.tokenizer.encode_batch(model.id, inputs, add_special_tokens=True, timeout=clock.left())
    for i, ids in enumerate(encoded):  # checked before any work is queued on the executor
        if len(ids) > model.context_length:
            raise InvalidArgument(f"'input[{i}]' has {len(ids)} tokens; this model's maximum is "
                                  f"{model.context_length}.", param="input",
                                  reason=wire.REASON_CONTEXT_LENGTH_EXCEEDED)
    prompt_tokens = sum(len(ids) for ids in encoded)

    async def start(replica: Replica) -> list[list[float]]:  # the whole unary call may be retried
        return await embed_on(replica.stub, model.triton_model, encoded, request_id=request_id,
                              timeout=clock.left())

    # No usage record unless the vectors came back: a failed embedding gives its reservation back.
    async with engine.admit(key, model, request_id=request_id, operation="embeddings", clock=clock,
                            prompt_tokens=prompt_tokens, max_tokens=0) as lease:
        async with engine.executors.open(model.triton_model, start, request_id=request_id) as vectors:
            lease.finished(STOP)
    return EmbedResult(vectors, prompt_tokens, lease.cost)


def validate_inputs(inputs: list[str], model: CatalogModel) -> None:
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
