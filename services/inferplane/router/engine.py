"""One generation through the mesh: validate, encode, stream from an executor, detokenize, stop, meter.

``GenerationEngine.generate`` is plain async Python: it takes a ``GenerationInput`` and yields
``Delta``s; the gRPC servicer only converts messages at the edge. The request's admission, queue slot and usage
record belong to its ``Lease`` (``lease.py``); the executor replica, its load count and the retry to
``ReplicaSet.open`` (``replicas.py``); ``docs/router.md`` follows one request through them.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

from opentelemetry import trace

from inferplane.common.catalog import Catalog, CatalogModel
from inferplane.common.errors import InvalidArgument, NotFound, Unavailable
from inferplane.common.wire import (
    ERROR,
    FINISH_FROM_PB,
    REASON_CONTEXT_LENGTH_EXCEEDED,
    REASON_MODEL_NOT_FOUND,
    STOP,
)
from inferplane.router.admission import Admission, Metadata
from inferplane.router.capacity import Capacity
from inferplane.router.channel import ChannelSequence, sampled_traceparent
from inferplane.router.clients import KeyInfo, MeteringClient
from inferplane.router.lease import Clock, Lease, trace_request
from inferplane.router.outbox import UsageOutbox
from inferplane.router.replicas import Replica, ReplicaSet
from inferplane.router.streaming import Delta, ExecutorStream, TextOut
from inferplane.router.usage import UsageRecorder
from inferplane.tokenization import Tokenizer
from inferplane.v1 import common_pb2, executor_pb2

__all__ = ["Delta", "GenerationEngine", "GenerationInput", "completion_budget", "validate"]

MAX_STOP_SEQUENCES = 4


@dataclass(slots=True)
class GenerationInput:
    """A validated-at-the-edge request (types only; ranges are checked in ``validate``)."""

    model: str
    prompt: str | None = None
    messages: list[common_pb2.ChatMessage] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


def validate(inp: GenerationInput, model: CatalogModel) -> None:
    """Parameter checks that need no tokens (OpenAI's ranges)."""
    if inp.messages is not None:
        if "chat" not in model.tasks:
            raise InvalidArgument(f"The model `{model.id}` does not support chat completions.", param="model")
        if not inp.messages:
            raise InvalidArgument("'messages' must contain at least one message.", param="messages")
    else:
        if "completion" not in model.tasks:
            raise InvalidArgument(f"The model `{model.id}` does not support completions.", param="model")
        if not inp.prompt:
            raise InvalidArgument("'prompt' must be a non-empty string.", param="prompt")
    if inp.max_tokens is not None and inp.max_tokens < 1:
        raise InvalidArgument(f"Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, "
                              f"but got {inp.max_tokens} instead.", param="max_tokens")
    if inp.temperature is not None and not 0.0 <= inp.temperature <= 2.0:
        raise InvalidArgument("'temperature' must be between 0 and 2.", param="temperature")
    if inp.top_p is not None and not 0.0 < inp.top_p <= 1.0:
        raise InvalidArgument("'top_p' must be greater than 0 and at most 1.", param="top_p")
    if inp.top_k is not None and inp.top_k < 0:
        raise InvalidArgument("'top_k' must be >= 0.", param="top_k")
    if len(inp.stop) > MAX_STOP_SEQUENCES or any(not s for s in inp.stop):
        raise InvalidArgument(f"'stop' takes up to {MAX_STOP_SEQUENCES} non-empty strings.", param="stop")


def completion_budget(prompt_tokens: int, max_tokens: int | None, model: CatalogModel) -> int:
    room = model.context_length - prompt_tokens
    if room < 1:
        raise InvalidArgument(
            f"This model's maximum context length is {model.context_length} tokens. However, your prompt "
            f"has {prompt_tokens} tokens, which leaves no room for a completion.", param="messages",
            reason=REASON_CONTEXT_LENGTH_EXCEEDED)
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise InvalidArgument(
            f"This model's maximum context length is {model.context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
            f"completion). Please reduce the prompt or max_tokens.", param="max_tokens",
            reason=REASON_CONTEXT_LENGTH_EXCEEDED)
    return max_tokens


# What inferplane keys (and most providers' keys) look like: never repeated back in a message.
KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_-]{8,}")




class GenerationEngine:
    def __init__(self, *, catalog: Catalog, tokenizer: Tokenizer, executors: ReplicaSet,
                 metering: MeteringClient, request_timeout_s: float = 600.0, admission: Admission | None = None,
                 outbox: UsageOutbox | None = None) -> None:
        """``tokenizer`` encodes prompts and turns streamed ids into text (in process or through the tokenizer
        service: the router's settings pick)."""
        self.catalog = catalog
        self.tokenizer = tokenizer
        self.executors = executors
        self.request_timeout_s = request_timeout_s
        self.admission = admission
        self.usage = UsageRecorder(metering, outbox)
        self.capacity = Capacity(
            lambda mid: executors.serving_count(self.model(mid).triton_model),
            per_replica=lambda mid: self.model(mid).concurrency_per_replica,
            max_queue=lambda mid: self.model(mid).max_queue,
            queue_timeout_s=lambda mid: self.model(mid).queue_timeout_s)
        executors.on_change = self.capacity.wake_all

    def model(self, model_id: str) -> CatalogModel:
        model = self.catalog.get(model_id)
        if model is None:
            # an API key pasted into "model" is not echoed (error messages end up in traces and logs)
            shown = "(a value that looks like an API key)" if KEY_LIKE.search(model_id) else model_id
            raise NotFound(f"The model `{shown}` does not exist or you do not have access to it.",
                           param="model", reason=REASON_MODEL_NOT_FOUND)
        return model

    def clock(self, model: CatalogModel, deadline: float | None) -> Clock:
        """The request's clock: the caller's deadline, capped by the model's (else the router's) limit."""
        return Clock.start(deadline, model.request_timeout_s or self.request_timeout_s)

    def admit(self, key: KeyInfo, model: CatalogModel, *, request_id: str, operation: str, clock: Clock,
              prompt_tokens: int, max_tokens: int) -> Lease:
        """The request's lease (``lease.py``): entering admits it and takes a slot of the model's queue; leaving
        leaves its one usage record, or gives back what it held when no executor was asked."""
        return Lease(self.admission, self.capacity.gate(model.id), self.usage, key=key, model=model,
                     request_id=request_id, operation=operation, clock=clock, prompt_tokens=prompt_tokens,
                     max_tokens=max_tokens)

    async def count_tokens(self, model_id: str, messages: list[common_pb2.ChatMessage], *,
                           deadline: float | None = None) -> int:
        """The prompt tokens ``generate`` would count for this conversation: no admission, no executor, no usage."""
        model = self.model(model_id)
        validate(GenerationInput(model=model_id, messages=messages), model)
        encoded = await self.tokenizer.encode_chat(model.id, messages, timeout=self.clock(model, deadline).left())
        return len(encoded.token_ids)

    async def generate(self, inp: GenerationInput, *, key: KeyInfo, request_id: str,
                       deadline: float | None = None,
                       on_admitted: Callable[[Metadata], Awaitable[None]] | None = None) -> AsyncGenerator[Delta]:
        """``on_admitted`` receives the rate-limit headers of an admitted request, before any work."""
        model = self.model(inp.model)
        validate(inp, model)
        clock = self.clock(model, deadline)
        operation = "chat" if inp.messages is not None else "text_completion"
        trace_request(operation, model.id, request_id, key)
        _trace_sampling(inp)
        if inp.messages is not None:
            encoded = await self.tokenizer.encode_chat(model.id, inp.messages, timeout=clock.left())
        else:
            encoded = await self.tokenizer.encode_text(model.id, inp.prompt or "", timeout=clock.left())
        prompt_tokens = len(encoded.token_ids)
        max_tokens = completion_budget(prompt_tokens, inp.max_tokens, model)
        req = executor_request(inp, model, request_id, encoded.token_ids, encoded.stop_token_ids, max_tokens)

        async def start(replica: Replica) -> ChannelSequence | ExecutorStream:  # each attempt, on the replica picked
            lease.began()
            if replica.link is not None:  # a sequence on the replica's channel
                return await replica.link.open(req, timeout=clock.left(), traceparent=sampled_traceparent())
            return await ExecutorStream.open(replica.stub.Generate(req, timeout=clock.left()))

        async with self.admit(key, model, request_id=request_id, operation=operation, clock=clock,
                              prompt_tokens=prompt_tokens, max_tokens=max_tokens) as lease:
            if on_admitted is not None:
                await on_admitted(lease.headers)
            async with (TextOut(self.tokenizer.decoder(model.id, timeout=clock.left()), inp.stop) as text,
                        self.executors.open(model.triton_model, start, request_id=request_id) as stream, stream):
                async for msg in stream:
                    if msg.token_ids:
                        lease.tokens(len(msg.token_ids))
                        if delta := await text.push(msg.token_ids):
                            yield delta
                        if text.stopped:
                            lease.finish = STOP
                            break
                    if msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                        # The model's own counts of what it consumed and produced are authoritative.
                        lease.finished(FINISH_FROM_PB.get(msg.finish_reason, ERROR),
                                       prompt_tokens=msg.usage.prompt_tokens,
                                       completion_tokens=msg.usage.completion_tokens)
                        break
                if lease.finish is None:
                    raise Unavailable("the executor ended the stream before the generation finished")
                if tail := await text.flush():
                    yield tail
                if text.stopped:
                    lease.finish = STOP
        # The lease has left its usage record (stored, for a finished request): the last message carries the cost.
        yield Delta("", text.unsent(lease.completion_tokens), lease.finish_pb, lease.prompt_tokens,
                    lease.completion_tokens, lease.cost, text.stop_sequence)

    async def drain(self) -> None:
        """Wait for usage records still being written (at shutdown)."""
        await self.usage.drain()


def executor_request(inp: GenerationInput, model: CatalogModel, request_id: str, prompt_token_ids: list[int],
                     stop_token_ids: list[int], max_tokens: int) -> executor_pb2.ExecutorGenerateRequest:
    req = executor_pb2.ExecutorGenerateRequest(
        model=model.triton_model, prompt_token_ids=prompt_token_ids, max_tokens=max_tokens,
        stop_token_ids=stop_token_ids, request_id=request_id, stream_interval=model.stream_interval)
    for name in ("temperature", "top_p", "top_k", "seed"):
        value = getattr(inp, name)
        if value is not None:
            setattr(req.sampling, name, value)
    return req


def _trace_sampling(inp: GenerationInput) -> None:
    span = trace.get_current_span()
    for attr, value in (("gen_ai.request.max_tokens", inp.max_tokens), ("gen_ai.request.temperature",
                        inp.temperature), ("gen_ai.request.top_p", inp.top_p), ("gen_ai.request.seed", inp.seed)):
        if value is not None:
            span.set_attribute(attr, value)
