"""One generation through the mesh: validate, encode, stream from an executor, detokenize, stop, meter.

``GenerationEngine.generate`` is plain async Python: it takes a ``GenerationInput`` and yields
``Delta``s; the gRPC servicer only converts messages at the edge. The request's admission, queue slot and usage
record belong to its ``Lease`` (``lease.py``); the executor replica, its load count and the retry to
``ReplicaSet.open`` (``replicas.py``); ``docs/router.md`` follows one request through them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

from opentelemetry import trace
from prometheus_client import Counter

from inferplane.common.catalog import MAX_FALLBACKS, Catalog, CatalogModel
from inferplane.common.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable
from inferplane.common.wire import (
    DEFAULT_TIER,
    ERROR,
    FINISH_FROM_PB,
    FINISH_TO_PB,
    LENGTH,
    REASON_CONTEXT_LENGTH_EXCEEDED,
    REASON_MODEL_NOT_FOUND,
    STOP,
    TIER_TO_PB,
)
from inferplane.router import canary, tools
from inferplane.router.admission import Admission, Counted, Metadata
from inferplane.router.capacity import Capacity, Overloaded
from inferplane.router.channel import ChannelSequence, sampled_traceparent
from inferplane.router.clients import KeyInfo, MeteringClient
from inferplane.router.lease import Clock, Lease, trace_request
from inferplane.router.outbox import UsageOutbox
from inferplane.router.replicas import Replica, ReplicaSet
from inferplane.router.streaming import Delta, ExecutorStream, TextOut
from inferplane.router.usage import UsageRecorder
from inferplane.tokenization import Tokenizer
from inferplane.v1 import common_pb2, executor_pb2, router_pb2

log = logging.getLogger(__name__)
FALLBACKS = Counter("inferplane_router_fallbacks", "Requests passed to a fallback model before any output",
                    ["model", "to"])

__all__ = ["Delta", "GenerationEngine", "GenerationInput", "completion_budget", "validate"]

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 128  # OpenAI's limit on n
MAX_TOP_LOGPROBS = 20


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
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    constraint: common_pb2.Constraint | None = None
    tools: list[common_pb2.FunctionTool] = field(default_factory=list)
    tool_choice: router_pb2.ToolChoice = field(default_factory=router_pb2.ToolChoice)
    parallel_tool_calls: bool = True
    # OpenAI's ``user``: a stable id of the end user; a model splitting its traffic serves one user one version.
    user: str = ""
    # Models to try when ``model`` cannot serve now (REST ``models``); empty: the catalog's ``fallbacks``.
    fallback_models: list[str] = field(default_factory=list)
    # The service tier (``wire.TIER_TO_PB``'s names): its place in the queue and its price.
    service_tier: str = DEFAULT_TIER
    # A session id (REST: ``x-session-id``): its requests keep to one executor replica (else ``user`` does).
    session_id: str = ""


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
    if not 1 <= inp.n <= MAX_CHOICES:
        raise InvalidArgument(f"'n' must be between 1 and {MAX_CHOICES}.", param="n")
    if not 0 <= inp.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}.", param="top_logprobs")
    if inp.top_logprobs and not inp.logprobs:
        raise InvalidArgument("'top_logprobs' needs 'logprobs' to be true.", param="top_logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(inp, name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise InvalidArgument(f"'{name}' must be between -2 and 2.", param=name)
    if inp.repetition_penalty is not None and not 0 < inp.repetition_penalty <= 100:
        raise InvalidArgument("'repetition_penalty' must be greater than 0 (1 is off).", param="repetition_penalty")
    if inp.min_tokens is not None and inp.min_tokens < 0:
        raise InvalidArgument("'min_tokens' must be >= 0.", param="min_tokens")
    if inp.min_tokens and inp.max_tokens is not None and inp.min_tokens > inp.max_tokens:
        raise InvalidArgument("'min_tokens' must not exceed 'max_tokens'.", param="min_tokens")
    if any(not -100 <= b <= 100 or math.isnan(b) for b in inp.logit_bias.values()):
        raise InvalidArgument("'logit_bias' values must be between -100 and 100.", param="logit_bias")
    if (inp.tools or inp.tool_choice.mode) and inp.messages is None:
        raise InvalidArgument("'tools' are only supported with chat messages.", param="tools")


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
                 outbox: UsageOutbox | None = None, fair_queue: bool = True) -> None:
        """``tokenizer`` encodes prompts and turns streamed ids into text (in process or through the tokenizer
        service: the router's settings pick). ``fair_queue``: each model's queue is fair across tenants within a
        service tier (``capacity.ModelGate``)."""
        self.catalog = catalog
        self.tokenizer = tokenizer
        self.executors = executors
        self.request_timeout_s = request_timeout_s
        self.admission = admission
        self.usage = UsageRecorder(metering, outbox)
        # Models taken out of the catalog while requests of theirs may still hold a slot of their gate.
        self._retired: dict[str, CatalogModel] = {}
        self.capacity = Capacity(
            lambda mid: executors.serving_count(self._known(mid).triton_model),
            per_replica=lambda mid: self._known(mid).concurrency_per_replica,
            max_queue=lambda mid: self._known(mid).max_queue,
            queue_timeout_s=lambda mid: self._known(mid).queue_timeout_s, fair=fair_queue)
        executors.on_change = self.capacity.wake_all

    def swap_catalog(self, catalog: Catalog) -> None:
        """Serve ``catalog`` from now on (metering's changed: ``catalog_watch.py``). One assignment in the event
        loop: a request looks its model up once, at its start, and keeps that ``CatalogModel`` to its end; a
        request that starts after this sees the new catalog (a removed model: 404 ``model_not_found``)."""
        for old in self.catalog.models:
            if catalog.get(old.id) is None:
                self._retired[old.id] = old
        for new in catalog.models:
            self._retired.pop(new.id, None)
        self.catalog = catalog
        self.capacity.refresh()

    def _known(self, model_id: str) -> CatalogModel:
        """The model in the catalog, else as it was when it left (its requests in flight release their slots)."""
        return self.catalog.get(model_id) or self._retired.get(model_id) or self.model(model_id)

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
              prompt_tokens: int, max_tokens: int, tier: str = DEFAULT_TIER, counted: Counted | None = None) -> Lease:
        """The request's lease (``lease.py``): entering admits it and takes a slot of the model's queue; leaving
        leaves its one usage record, or gives back what it held when no executor was asked. ``counted``: shared by
        the leases of one request's fallback chain (it counts once against the key's rate limits)."""
        return Lease(self.admission, self.capacity.gate(model.id), self.usage, key=key, model=model,
                     request_id=request_id, operation=operation, clock=clock, prompt_tokens=prompt_tokens,
                     max_tokens=max_tokens, tier=tier, counted=counted)

    async def count_tokens(self, model_id: str, messages: list[common_pb2.ChatMessage], *,
                           deadline: float | None = None) -> int:
        """The prompt tokens ``generate`` would count for this conversation: no admission, no executor, no usage."""
        model = self.model(model_id)
        validate(GenerationInput(model=model_id, messages=messages), model)
        encoded = await self.tokenizer.encode_chat(model.id, messages, timeout=self.clock(model, deadline).left())
        return len(encoded.token_ids)

    def chain(self, inp: GenerationInput, key: KeyInfo) -> list[CatalogModel]:
        """The models to try for ``inp``, in order: its model, then its fallbacks (docs/router.md).

        A request's own list (``fallback_models``) is checked as the model is (``NotFound``, ``PermissionDenied``,
        ``InvalidArgument`` naming ``models``); the catalog's list is filtered silently (an id not in the catalog, of
        another task, or that the key may not use is skipped)."""
        primary = self.model(inp.model)
        if len(inp.fallback_models) > MAX_FALLBACKS:
            raise InvalidArgument(f"'models' takes at most {MAX_FALLBACKS + 1} models.", param="models")
        chain = [primary]
        for model_id in inp.fallback_models or primary.fallbacks:
            model = self.catalog.get(model_id)
            if model is None:
                if inp.fallback_models:
                    shown = "(a value that looks like an API key)" if KEY_LIKE.search(model_id) else model_id
                    raise NotFound(f"The model `{shown}` in 'models' does not exist or you do not have access to it.",
                                   param="models", reason=REASON_MODEL_NOT_FOUND)
                continue
            if any(m.id == model.id for m in chain):
                continue
            if not key.may_use(model.id):
                if inp.fallback_models:
                    raise PermissionDenied(f"This API key may not use the model `{model.id}`.", param="models")
                continue
            try:
                validate(inp, model)
            except InvalidArgument as exc:
                if inp.fallback_models:
                    raise InvalidArgument(f"'models': {exc}", param="models") from None
                continue
            chain.append(model)
        return chain

    async def generate(self, inp: GenerationInput, *, key: KeyInfo, request_id: str,
                       deadline: float | None = None,
                       on_admitted: Callable[[Metadata], Awaitable[None]] | None = None) -> AsyncGenerator[Delta]:
        """``on_admitted`` receives the rate-limit headers of the first admitted attempt, before any work.

        Yields each choice's deltas (``n`` choices run at once, interleaved), then each choice's final delta (its
        finish reason), the last of them with the usage of all (``Delta.last``); every delta names the model that
        serves (``Delta.model``: a fallback's, when the model could not serve).

        Fallbacks: when a model cannot serve now (its queue is full or too slow: ``Overloaded``; no replica can take
        it, or it failed to load: ``Unavailable`` before any executor was asked), the next model of ``chain`` is
        tried, with its own admission (scope, budget at its own price; the rate limits count the request once: a
        fallback counts no second request, and its tokens replace those the model before it counted), its own queue
        and its own usage record. Never after an executor was asked (a usage record is owed) or output was sent.
        When every model fails, the first model's error is raised."""
        chain = self.chain(inp, key)
        admitted = _Once(on_admitted)
        counted = Counted()  # what the chain's admissions counted against the key's rate limits: once per request
        first_error: Exception | None = None
        for i, model in enumerate(chain):
            attempt = _Attempt()
            run = self._generate_on(model, inp, key=key, request_id=request_id, deadline=deadline,
                                    on_admitted=admitted, attempt=attempt, counted=counted)
            try:
                async with contextlib.aclosing(run):
                    async for delta in run:
                        attempt.yielded = True
                        delta.model, delta.service_tier = model.id, inp.service_tier
                        yield delta
                return
            except (Overloaded, Unavailable) as exc:
                if not attempt.may_fall_back(exc) or i == len(chain) - 1:
                    if first_error is not None:
                        raise first_error from exc
                    raise
                first_error = first_error or exc
                FALLBACKS.labels(model.id, chain[i + 1].id).inc()
                log.info("request %s: model %s cannot serve now (%s); falling back to %s", request_id, model.id,
                         exc, chain[i + 1].id)
                trace.get_current_span().add_event("inferplane.fallback", {"from": model.id, "to": chain[i + 1].id})

    async def _generate_on(self, model: CatalogModel, inp: GenerationInput, *, key: KeyInfo, request_id: str,
                           deadline: float | None, on_admitted: Callable[[Metadata], Awaitable[None]],
                           attempt: _Attempt, counted: Counted) -> AsyncGenerator[Delta]:
        """One model's try at the request (``generate`` walks the chain)."""
        # the version serving it (a canary split: sticky per user, else per request), kept to the request's end
        model = canary.serving(model, inp.user or request_id)
        validate(inp, model)
        clock = self.clock(model, deadline)
        operation = "chat" if inp.messages is not None else "text_completion"
        trace_request(operation, model.id, request_id, key)
        _trace_sampling(inp)
        constraint = inp.constraint
        mode: tools.Mode = "none"
        messages = inp.messages
        if messages is not None and (inp.tools or inp.tool_choice.mode or _has_tool_turns(messages)):
            tools.validate_tools(inp.tools)
            mode = tools.resolve_mode(inp.tools, inp.tool_choice)
            messages = tools.render_messages(messages, inp.tools, inp.tool_choice, parallel=inp.parallel_tool_calls)
            forced = tools.constraint_for(inp.tools, inp.tool_choice, inp.parallel_tool_calls)
            if forced is not None:
                if constraint is not None:
                    raise InvalidArgument("'response_format' cannot be combined with a tool_choice that forces a "
                                          "function call.", param="response_format")
                constraint = common_pb2.Constraint(json_schema=forced)
        if messages is not None:
            encoded = await self.tokenizer.encode_chat(model.id, messages, timeout=clock.left())
        else:
            encoded = await self.tokenizer.encode_text(model.id, inp.prompt or "", timeout=clock.left())
        prompt_tokens = len(encoded.token_ids)
        max_tokens = completion_budget(prompt_tokens, inp.max_tokens, model)
        req = executor_request(inp, model, request_id, encoded.token_ids,
                               [] if inp.ignore_eos else encoded.stop_token_ids, max_tokens, constraint)
        choices = [_Choice(i, tools.parser_for(inp.tools, inp.tool_choice, inp.parallel_tool_calls)
                           if mode != "none" else None, mode) for i in range(inp.n)]

        async with self.admit(key, model, request_id=request_id, operation=operation, clock=clock,
                              prompt_tokens=prompt_tokens, max_tokens=max_tokens * inp.n,
                              tier=inp.service_tier, counted=counted) as lease:
            attempt.lease = lease
            await on_admitted(lease.headers)

            def settle() -> None:
                """Once every choice has its finish: the request's (for the usage record, even if the caller leaves
                before the last message goes out)."""
                if any(c.finish is None for c in choices):
                    return
                failed = [c.finish or ERROR for c in choices if c.finish not in (STOP, LENGTH)]
                ran_out = any(c.finish == LENGTH for c in choices)
                lease.finished(failed[0] if failed else LENGTH if ran_out else STOP,
                               prompt_tokens=choices[0].prompt_tokens or prompt_tokens,
                               completion_tokens=sum(c.completion_tokens or c.received for c in choices),
                               cached_tokens=choices[0].cached_tokens)

            runs = [self._choice(choice, _for_choice(req, choice.index), inp, model, lease, clock, request_id,
                                 settle) for choice in choices]
            async with contextlib.aclosing(runs[0] if len(runs) == 1 else _merged(runs)) as deltas:
                async for delta in deltas:
                    yield delta
        # The lease has left its usage record (stored, for a finished request): the last message carries the cost.
        for choice in choices:
            final = choice.final()
            if choice is choices[-1]:
                final.last = True
                final.prompt_tokens, final.completion_tokens = lease.prompt_tokens, lease.completion_tokens
                final.cached_tokens = lease.cached_tokens
                final.cost_nanodollars = lease.cost
            yield final

    async def _choice(self, choice: _Choice, req: executor_pb2.ExecutorGenerateRequest, inp: GenerationInput,
                      model: CatalogModel, lease: Lease, clock: Clock, request_id: str,
                      settle: Callable[[], None]) -> AsyncGenerator[Delta]:
        """One choice's generation on an executor: its text deltas (with logprobs and tool calls) as they come."""

        async def start(replica: Replica) -> ChannelSequence | ExecutorStream:  # each attempt, on the replica picked
            lease.began()
            if replica.link is not None:  # a sequence on the replica's channel
                return await replica.link.open(req, timeout=clock.left(), traceparent=sampled_traceparent())
            return await ExecutorStream.open(replica.stub.Generate(req, timeout=clock.left()))

        prefix = self.executors.prefix(list(req.prompt_token_ids), block_size=model.prefix_block_size,
                                       capacity=model.prefix_cache_blocks)
        async with (TextOut(self.tokenizer.decoder(model.id, timeout=clock.left()), inp.stop) as text,
                    self.executors.open(model.triton_model, start, request_id=request_id, wait_s=clock.left(),
                                        session=inp.session_id or inp.user, prefix=prefix) as stream, stream):
            choice.text = text
            async for msg in stream:
                if msg.token_ids:
                    lease.tokens(len(msg.token_ids))
                    choice.received += len(msg.token_ids)
                    if inp.logprobs:
                        choice.pending_logprobs += await self._token_logprobs(model.id, msg, req.top_logprobs, clock)
                    if (delta := await text.push(msg.token_ids)) and (shaped := choice.shape(delta)):
                        yield shaped
                    if text.stopped:
                        choice.finish = STOP
                        settle()
                        break
                if msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    # The model's own counts of what it consumed and produced are authoritative.
                    choice.finish = FINISH_FROM_PB.get(msg.finish_reason, ERROR)
                    choice.prompt_tokens = msg.usage.prompt_tokens
                    choice.completion_tokens = msg.usage.completion_tokens
                    choice.cached_tokens = msg.usage.cached_tokens
                    settle()
                    break
            if choice.finish is None:
                raise Unavailable("the executor ended the stream before the generation finished")
            if (tail := await text.flush()) and (shaped := choice.shape(tail)):
                yield shaped
            if text.stopped:
                choice.finish = STOP
            if not choice.completion_tokens:  # stopped here (a stop sequence): the tokens received
                choice.completion_tokens = choice.received
            settle()

    async def _token_logprobs(self, model_id: str, msg: executor_pb2.ExecutorGenerateResponse, k: int,
                              clock: Clock) -> list[common_pb2.TokenLogprob]:
        """OpenAI's logprobs entries of a message's tokens: text and bytes of each token and of its alternatives."""
        ids = list(msg.token_ids)
        top_ids = list(msg.top_token_ids) if k else []
        raw = await self.tokenizer.token_bytes(model_id, ids + top_ids, timeout=clock.left())
        lps = list(msg.logprobs) or [math.nan] * len(ids)
        out = []
        for i, token_id in enumerate(ids):
            entry = common_pb2.TokenLogprob(token=raw[i].decode(errors="replace"), logprob=lps[i], bytes=raw[i],
                                            token_id=token_id)
            for j in range(i * k, (i + 1) * k if top_ids else 0):
                b = raw[len(ids) + j]
                entry.top_logprobs.add(token=b.decode(errors="replace"), logprob=msg.top_logprobs[j], bytes=b,
                                       token_id=top_ids[j])
            out.append(entry)
        return out

    async def drain(self) -> None:
        """Wait for usage records still being written (at shutdown)."""
        await self.usage.drain()


def executor_request(inp: GenerationInput, model: CatalogModel, request_id: str, prompt_token_ids: list[int],
                     stop_token_ids: list[int], max_tokens: int,
                     constraint: common_pb2.Constraint | None = None) -> executor_pb2.ExecutorGenerateRequest:
    req = executor_pb2.ExecutorGenerateRequest(
        model=model.triton_model, prompt_token_ids=prompt_token_ids, max_tokens=max_tokens,
        stop_token_ids=stop_token_ids, request_id=request_id, stream_interval=model.stream_interval,
        top_logprobs=inp.top_logprobs if inp.logprobs else 0, omit_logprobs=not inp.logprobs,
        service_tier=TIER_TO_PB[inp.service_tier])
    # always explicit: the executor (and the Triton model) would take an absent temperature for greedy
    req.sampling.temperature = model.default_temperature if inp.temperature is None else inp.temperature
    for name in ("top_p", "top_k", "seed", "repetition_penalty", "presence_penalty", "frequency_penalty",
                 "min_tokens"):
        value = getattr(inp, name)
        if value is not None:
            setattr(req.sampling, name, value)
    if inp.ignore_eos:
        req.sampling.ignore_eos = True
    for token_id, bias in inp.logit_bias.items():
        req.sampling.logit_bias[token_id] = bias
    if constraint is not None:
        req.constraint.CopyFrom(constraint)
    return req


def _for_choice(req: executor_pb2.ExecutorGenerateRequest, index: int) -> executor_pb2.ExecutorGenerateRequest:
    """Choice ``index``'s request: choice 0 is ``req``; the others draw from their own seed (seed + index), so that
    seeded choices differ from each other and each is reproducible."""
    if index == 0:
        return req
    out = executor_pb2.ExecutorGenerateRequest()
    out.CopyFrom(req)
    if out.sampling.HasField("seed"):
        out.sampling.seed = (out.sampling.seed + index + 2**63) % 2**64 - 2**63
    return out


class _Once:
    """``on_admitted`` called for the first admitted attempt only (initial metadata goes out once)."""

    def __init__(self, call: Callable[[Metadata], Awaitable[None]] | None) -> None:
        self._call = call

    async def __call__(self, headers: Metadata) -> None:
        call, self._call = self._call, None
        if call is not None:
            await call(headers)


@dataclass(slots=True)
class _Attempt:
    """What one model's try of a request got to: its lease (once admitted), whether a delta went out."""

    lease: Lease | None = None
    yielded: bool = False

    def may_fall_back(self, exc: Exception) -> bool:
        """The model cannot serve now and nothing is owed: overloaded (its queue), or unavailable after admission
        (not metering's budget check) with no executor asked."""
        if self.yielded or (self.lease is not None and self.lease.working):
            return False
        return isinstance(exc, Overloaded) or self.lease is not None


def _has_tool_turns(messages: list[common_pb2.ChatMessage]) -> bool:
    return any(m.tool_calls or m.role == "tool" for m in messages)


class _Choice:
    """One choice's state: its text (stop sequences), logprobs not yet sent, tool-call parser and counts."""

    def __init__(self, index: int, parser: tools.ToolCallParser | None, mode: tools.Mode) -> None:
        self.index = index
        self.parser = parser
        self.mode = mode
        self.text: TextOut | None = None
        self.pending_logprobs: list[common_pb2.TokenLogprob] = []
        self.carry = 0  # tokens of deltas that left nothing to send (text held by the tool parser)
        self.finish: str | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0  # of prompt_tokens, those the model reused from its prefix cache
        self.completion_tokens = 0  # the model's count once it finished (else, after a stop sequence, received)
        self.received = 0  # token ids that arrived

    def shape(self, delta: Delta) -> Delta | None:
        """The delta as sent: its choice index, its tokens' logprobs, the tool parser's content and call deltas."""
        delta.index = self.index
        delta.token_count += self.carry
        self.carry = 0
        if self.pending_logprobs:
            delta.logprobs = self.pending_logprobs[:delta.token_count]
            del self.pending_logprobs[:delta.token_count]
        if self.parser is not None:
            delta.text, calls = self.parser.feed(delta.text)
            delta.tool_calls = list(calls)
        if not (delta.text or delta.tool_calls or delta.logprobs):
            self.carry = delta.token_count
            return None
        return delta

    def final(self) -> Delta:
        """The choice's last delta: what is still held, and its finish reason."""
        assert self.text is not None and self.finish is not None
        delta = Delta("", self.text.unsent(self.completion_tokens) + self.carry, index=self.index,
                      stop_sequence=self.text.stop_sequence, logprobs=self.pending_logprobs)
        reason: int = FINISH_TO_PB[self.finish]
        if self.parser is not None:
            delta.text, calls, made = self.parser.finish()
            delta.tool_calls = list(calls)
            reason = tools.finish_reason(self.mode, made, reason)
        delta.finish_reason = reason
        return delta


async def _merged(runs: list[AsyncGenerator[Delta]]) -> AsyncGenerator[Delta]:
    """The choices' deltas as they come; the first failure cancels the other choices and is raised."""
    queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()

    async def pump(run: AsyncGenerator[Delta]) -> None:
        try:
            async with contextlib.aclosing(run):
                async for delta in run:
                    queue.put_nowait(delta)
            queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait(exc)

    tasks = [asyncio.ensure_future(pump(run)) for run in runs]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _trace_sampling(inp: GenerationInput) -> None:
    span = trace.get_current_span()
    for attr, value in (("gen_ai.request.max_tokens", inp.max_tokens), ("gen_ai.request.temperature",
                        inp.temperature), ("gen_ai.request.top_p", inp.top_p), ("gen_ai.request.seed", inp.seed),
                        ("gen_ai.request.choice.count", inp.n if inp.n > 1 else None)):
        if value is not None:
            span.set_attribute(attr, value)
