"""The public RouterService: authenticate, convert at the edge, delegate to ``GenerationEngine``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from inferplane.common import wire
from inferplane.common.errors import InvalidArgument
from inferplane.common.server import caller_key
from inferplane.router.auth import KeyVerifier
from inferplane.router.embeddings import embed
from inferplane.router.engine import GenerationEngine, GenerationInput
from inferplane.router.tokenize import detokenize, tokenize
from inferplane.v1 import common_pb2, router_pb2, router_pb2_grpc

TASKS = {"chat": common_pb2.MODEL_TASK_CHAT, "completion": common_pb2.MODEL_TASK_COMPLETION,
         "embedding": common_pb2.MODEL_TASK_EMBEDDING}


def request_id_from(metadata: wire.Metadata | None) -> str:
    """The caller's ``x-request-id`` (``InvalidArgument`` when it breaks the rule), or a new one."""
    value = wire.metadata_value(metadata, wire.REQUEST_ID)
    if value is None:
        return wire.new_request_id()
    rid = wire.text(value)
    if not wire.valid_request_id(rid):
        raise InvalidArgument(wire.BAD_REQUEST_ID, param=wire.REQUEST_ID)
    return rid


def input_from_pb(req: router_pb2.GenerateRequest) -> GenerationInput:
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidArgument("either 'prompt' or 'messages' is required", param="messages")
    if req.service_tier not in wire.TIER_FROM_PB:
        raise InvalidArgument(f"unknown service tier {req.service_tier}", param="service_tier")
    s = req.sampling

    def opt(msg: Any, name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else None

    return GenerationInput(
        model=req.model,
        prompt=req.prompt if which == "prompt" else None,
        messages=list(req.chat.messages) if which == "chat" else None,
        max_tokens=opt(req, "max_tokens"),
        temperature=opt(s, "temperature"),
        top_p=opt(s, "top_p"),
        top_k=opt(s, "top_k"),
        seed=opt(s, "seed"),
        stop=list(req.stop),
        repetition_penalty=opt(s, "repetition_penalty"),
        presence_penalty=opt(s, "presence_penalty"),
        frequency_penalty=opt(s, "frequency_penalty"),
        min_tokens=opt(s, "min_tokens"),
        ignore_eos=s.ignore_eos,
        logit_bias=dict(s.logit_bias),
        n=req.n if req.HasField("n") and req.n != 0 else 1,
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs if req.HasField("top_logprobs") else 0,
        constraint=req.constraint if req.HasField("constraint") and req.constraint.WhichOneof("kind") else None,
        tools=list(req.tools),
        tool_choice=req.tool_choice,
        parallel_tool_calls=req.parallel_tool_calls if req.HasField("parallel_tool_calls") else True,
        user=req.user,
        fallback_models=list(req.fallback_models),
        service_tier=wire.TIER_FROM_PB.get(req.service_tier, wire.DEFAULT_TIER),
        session_id=req.session_id,
    )


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, engine: GenerationEngine, keys: KeyVerifier) -> None:
        self._engine = engine
        self._keys = keys

    async def Generate(self, request: router_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb2.GenerateResponse]:
        metadata = context.invocation_metadata()
        request_id = request_id_from(metadata)
        context.set_trailing_metadata(((wire.REQUEST_ID, request_id),))
        key = await self._keys.verify(caller_key(metadata))
        inp = input_from_pb(request)

        async def admitted(headers: tuple[tuple[str, str], ...]) -> None:
            # initial metadata once admitted: the gateway turns x-ratelimit-* into headers of the response
            await context.send_initial_metadata(((wire.REQUEST_ID, request_id), *headers))

        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        created = int(time.time())
        # aclosing: when this handler is closed at a yield (the caller left), the engine's generator is closed
        # with it, so its cleanup (cancel the executor, record usage) runs now, not when it is collected
        deltas = self._engine.generate(inp, key=key, request_id=request_id, deadline=deadline, on_admitted=admitted)
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                # one message per delta: only the fields that are set are passed (an empty list or a default
                # still costs its conversion, and most deltas are a few tokens of text)
                msg = router_pb2.GenerateResponse(request_id=request_id, text=delta.text, token_count=delta.token_count,
                                                  created=created, model=delta.model or request.model,
                                                  index=delta.index, service_tier=wire.TIER_TO_PB.get(
                                                      delta.service_tier, common_pb2.SERVICE_TIER_UNSPECIFIED))
                if delta.finish_reason:
                    msg.finish_reason = delta.finish_reason  # type: ignore[assignment]
                if delta.logprobs:
                    msg.logprobs.extend(delta.logprobs)
                if delta.tool_calls:
                    msg.tool_calls.extend(delta.tool_calls)
                if delta.last:
                    msg.usage.prompt_tokens = delta.prompt_tokens
                    msg.usage.completion_tokens = delta.completion_tokens
                    msg.usage.total_tokens = delta.prompt_tokens + delta.completion_tokens
                    msg.usage.cached_tokens = delta.cached_tokens
                    if delta.cost_nanodollars is not None:
                        msg.usage.cost_nanodollars = delta.cost_nanodollars
                if delta.stop_sequence is not None:
                    msg.stop_sequence = delta.stop_sequence
                yield msg

    async def Embed(self, request: router_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> router_pb2.EmbedResponse:
        metadata = context.invocation_metadata()
        request_id = request_id_from(metadata)
        context.set_trailing_metadata(((wire.REQUEST_ID, request_id),))
        key = await self._keys.verify(caller_key(metadata))
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        result = await embed(self._engine, request.model, list(request.inputs), key=key, request_id=request_id,
                             deadline=deadline)
        return router_pb2.EmbedResponse(
            request_id=request_id, model=request.model,
            embeddings=[common_pb2.Embedding(values=v) for v in result.vectors],
            usage=common_pb2.Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens,
                                   cost_nanodollars=result.cost_nanodollars))

    async def CountTokens(self, request: router_pb2.CountTokensRequest,
                          context: grpc.aio.ServicerContext) -> router_pb2.CountTokensResponse:
        metadata = context.invocation_metadata()
        context.set_trailing_metadata(((wire.REQUEST_ID, request_id_from(metadata)),))
        await self._keys.verify(caller_key(metadata))
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        count = await self._engine.count_tokens(request.model, list(request.chat.messages), deadline=deadline)
        return router_pb2.CountTokensResponse(input_tokens=count, model=request.model)

    async def ListModels(self, request: router_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> router_pb2.ListModelsResponse:
        await self._keys.verify(caller_key(context.invocation_metadata()))
        prices = self._engine.admission.prices if self._engine.admission is not None else None
        if prices is not None:
            await prices.ensure_fresh()
        models = []
        for m in self._engine.catalog.models:
            info = common_pb2.ModelInfo(id=m.id, owned_by=m.owned_by, created=m.created,
                                        # "infer" has no ModelTask value: such a model lists no task here
                                        tasks=[TASKS[t] for t in m.tasks if t in TASKS],
                                        context_length=m.context_length,
                                        state=self._engine.executors.model_state(m.triton_model))  # type: ignore[arg-type]
            pricing = prices.pricing_pb(m.id) if prices is not None else None
            if pricing is not None:
                pricing.tier_multipliers.update({str(k): v for k, v in m.tier_multipliers.items()})
                info.pricing.CopyFrom(pricing)
            models.append(info)
        return router_pb2.ListModelsResponse(models=models)

    async def Tokenize(self, request: router_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> router_pb2.TokenizeResponse:
        await self._keys.verify(caller_key(context.invocation_metadata()))
        which = request.WhichOneof("input")
        result = await tokenize(self._engine, request.model, prompt=request.prompt if which == "prompt" else None,
                                messages=list(request.chat.messages) if which == "chat" else None,
                                add_special_tokens=request.add_special_tokens, deadline=_deadline(context))
        return router_pb2.TokenizeResponse(tokens=result.token_ids, max_model_len=result.max_model_len)

    async def Detokenize(self, request: router_pb2.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> router_pb2.DetokenizeResponse:
        await self._keys.verify(caller_key(context.invocation_metadata()))
        text = await detokenize(self._engine, request.model, list(request.tokens), deadline=_deadline(context))
        return router_pb2.DetokenizeResponse(prompt=text)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None

