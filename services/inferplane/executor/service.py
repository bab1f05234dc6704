"""The executor's gRPC API: thin edges over ``TritonLLMClient`` and the channel's sessions (``channel.py``).

``Channel`` multiplexes many sequences on one stream per router (what the router uses). ``Generate`` is the
per-request contract, one call per generation: tokens are forwarded as they arrive; when the reader falls
behind, the tokens that are ready go out together in one message (coalescing under backpressure) instead of
one message each. A request's ``stream_interval`` (the model's, from the catalog) makes every message after the
first hold that many.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING

import grpc
from prometheus_client import Counter, Gauge

from inferplane.common.errors import FailedPrecondition, InvalidArgument
from inferplane.common.tasks import keep
from inferplane.common.wire import FINISH_TO_PB
from inferplane.executor.triton_client import GenerateParams, TritonChunk, TritonLLMClient
from inferplane.modeling.contract import LLM
from inferplane.v1 import common_pb2, executor_pb2, executor_pb2_grpc

if TYPE_CHECKING:
    from inferplane.executor.channel import ChannelService
    from inferplane.executor.model_control import ModelControl, ModelInfo

log = logging.getLogger(__name__)

def params_from_pb(req: executor_pb2.ExecutorGenerateRequest) -> GenerateParams:
    if not req.prompt_token_ids:
        raise InvalidArgument("prompt_token_ids must not be empty", param="prompt")
    if req.max_tokens < 1:
        raise InvalidArgument("max_tokens must be at least 1", param="max_tokens")
    if not 0 <= req.top_logprobs <= LLM.MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be in [0, {LLM.MAX_TOP_LOGPROBS}]", param="top_logprobs")
    s = req.sampling
    return GenerateParams(
        prompt_token_ids=list(req.prompt_token_ids),
        max_tokens=req.max_tokens,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k if s.HasField("top_k") else None,
        seed=s.seed if s.HasField("seed") else None,
        stop_token_ids=list(req.stop_token_ids),
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else None,
        presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else None,
        frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else None,
        min_tokens=s.min_tokens if s.HasField("min_tokens") else None,
        ignore_eos=s.ignore_eos,
        logit_bias=dict(s.logit_bias),
        top_logprobs=req.top_logprobs,
        constraint=constraint_spec(req.constraint) if req.HasField("constraint") else None,
    )


def constraint_spec(c: common_pb2.Constraint) -> str | None:
    """The contract's grammar spec (JSON) of a ``Constraint``; None when no kind is set."""
    kind = c.WhichOneof("kind")
    if kind is None:
        return None
    value = getattr(c, kind)
    return json.dumps({kind: value})


def chunk_to_pb(chunk: TritonChunk, final: TritonChunk | None, *,
                omit_logprobs: bool = False) -> executor_pb2.ExecutorGenerateResponse:
    msg = executor_pb2.ExecutorGenerateResponse(token_ids=chunk.token_ids,
                                               logprobs=() if omit_logprobs else chunk.logprobs,
                                               top_token_ids=chunk.top_ids, top_logprobs=chunk.top_logprobs)
    if final is not None:
        msg.finish_reason = FINISH_TO_PB.get(final.finish_reason or "", common_pb2.FINISH_REASON_ERROR)
        msg.usage.prompt_tokens = final.prompt_tokens
        msg.usage.completion_tokens = final.completion_tokens
        msg.usage.total_tokens = final.prompt_tokens + final.completion_tokens
        msg.usage.cached_tokens = final.cached_tokens
    return msg


async def coalesce(chunks: AsyncIterator[TritonChunk],
                   interval: int = 1) -> AsyncIterator[tuple[TritonChunk, TritonChunk | None]]:
    """Yield (tokens, final or None): every token (with its log-probabilities) that arrived while the consumer was
    busy comes in one chunk. With ``interval`` > 1, every message after the first holds at least that many ids (the
    final one: what is left)."""
    queue: asyncio.Queue[TritonChunk | BaseException] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for chunk in chunks:
                queue.put_nowait(chunk)
        except BaseException as exc:  # handed to the consumer, re-raised there
            queue.put_nowait(exc)

    task = asyncio.create_task(pump())
    ended = False
    want = 1  # ids a message waits for: the first token goes out at once, then ``interval`` at a time
    try:
        while True:
            tokens = TritonChunk(token_ids=[])
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    if tokens.token_ids:
                        yield tokens, None
                    raise item
                tokens.extend(item)
                if item.finish_reason is not None:
                    ended = True
                    yield tokens, item
                    return
                if len(tokens.token_ids) >= want and queue.empty():
                    break
            yield tokens, None
            want = max(1, interval)
    finally:
        if ended:
            # The generation is over: let the pump finish reading the Triton stream to its end. Cancelling it
            # would cancel the finished stream, which tritonserver leaks memory for (~7 KB a stream).
            keep(task)
        else:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


ACTIVE = Gauge("inferplane_executor_active_requests",
               "Generations in progress on this executor (Generate calls and channel sequences)")
QUEUE_DEPTH = Gauge("inferplane_executor_queue_depth", "Requests sent to Triton that have not produced a token yet")
TRITON_CANCELS = Counter("inferplane_executor_cancellations", "Generations cancelled towards Triton")
FINISHED = Counter("inferplane_executor_generations_finished", "Generations that Triton ran to their end")


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, client: TritonLLMClient, models: list[str], channels: ChannelService | None = None, *,
                 control: ModelControl | None = None) -> None:
        """``channels`` serves ``Channel`` (over whichever ``GenerationBackend`` it was given); None: ``Channel``
        is refused (FAILED_PRECONDITION) and only ``Generate`` serves. ``control``: explicit model control
        (``LoadModel``, ``UnloadModel``, each model's state); None: those are refused (FAILED_PRECONDITION)."""
        self._client = client
        self._models = models
        self._channels = channels
        self._control = control
        self.active = 0  # Generate calls in progress
        self.triton_version = ""

    async def Channel(self, request_iterator: AsyncIterator[executor_pb2.ChannelRequest],
                      context: grpc.aio.ServicerContext) -> AsyncGenerator[executor_pb2.ChannelFrame]:
        if self._channels is None:
            raise FailedPrecondition("this executor serves Generate only")
        async with contextlib.aclosing(self._channels.serve(request_iterator)) as frames:  # closed in this task
            async for frame in frames:
                yield frame

    async def Generate(self, request: executor_pb2.ExecutorGenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[executor_pb2.ExecutorGenerateResponse]:
        params = params_from_pb(request)
        self.active += 1
        ACTIVE.inc()
        QUEUE_DEPTH.inc()
        queued, finished = True, False
        try:
            async with self._using(request.model, request.request_id):
                chunks = self._client.generate(request.model, params, request_id=request.request_id)
                async for tokens, final in coalesce(chunks, request.stream_interval):
                    if queued:
                        queued = False
                        QUEUE_DEPTH.dec()
                    finished = final is not None
                    yield chunk_to_pb(tokens, final, omit_logprobs=request.omit_logprobs)
        finally:
            self.active -= 1
            ACTIVE.dec()
            if queued:
                QUEUE_DEPTH.dec()
            if finished:
                FINISHED.inc()
            else:
                TRITON_CANCELS.inc()

    async def Embed(self, request: executor_pb2.ExecutorEmbedRequest,
                    context: grpc.aio.ServicerContext) -> executor_pb2.ExecutorEmbedResponse:
        inputs = [list(i.token_ids) for i in request.inputs]
        if not inputs or any(not ids for ids in inputs):
            raise InvalidArgument("every embedding input needs at least one token id", param="input")
        async with self._using(request.model, request.request_id):
            vectors = await self._client.embed(request.model, inputs, request_id=request.request_id)
        return executor_pb2.ExecutorEmbedResponse(embeddings=[common_pb2.Embedding(values=v) for v in vectors])

    async def GetStatus(self, request: executor_pb2.GetStatusRequest,
                        context: grpc.aio.ServicerContext) -> executor_pb2.GetStatusResponse:
        active = self.active + (self._channels.active if self._channels is not None else 0)
        if self._control is None:
            ready = [m for m in self._models if await self._client.is_ready([m])]
            return executor_pb2.GetStatusResponse(ready_models=ready, active_requests=active,
                                                  triton_version=self.triton_version)
        infos = await self._control.index()
        return executor_pb2.GetStatusResponse(
            ready_models=[i.name for i in infos if i.state == common_pb2.MODEL_STATE_LOADED],
            active_requests=active, triton_version=self.triton_version, models=[status_to_pb(i) for i in infos])

    async def LoadModel(self, request: executor_pb2.LoadModelRequest,
                        context: grpc.aio.ServicerContext) -> executor_pb2.LoadModelResponse:
        control = self._require_control()
        took = await control.load(request.model, request.request_id)
        return executor_pb2.LoadModelResponse(model=await self._status_of(control, request.model), load_s=took)

    async def UnloadModel(self, request: executor_pb2.UnloadModelRequest,
                          context: grpc.aio.ServicerContext) -> executor_pb2.UnloadModelResponse:
        control = self._require_control()
        await control.unload(request.model)
        return executor_pb2.UnloadModelResponse(model=await self._status_of(control, request.model))

    def _require_control(self) -> ModelControl:
        if self._control is None:
            raise FailedPrecondition("this executor has no model control")
        return self._control

    @staticmethod
    async def _status_of(control: ModelControl, model: str) -> executor_pb2.ModelStatus:
        for info in await control.index():
            if info.name == model:
                return status_to_pb(info)
        return executor_pb2.ModelStatus(name=model)

    def _using(self, model: str, request_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._control.using(model, request_id) if self._control is not None else contextlib.nullcontext()


def status_to_pb(info: ModelInfo) -> executor_pb2.ModelStatus:
    return executor_pb2.ModelStatus(name=info.name, state=info.state, reason=info.reason,  # type: ignore[arg-type]
                                    idle_s=round(info.idle_s, 3), idle_unload_s=info.idle_unload_s)
