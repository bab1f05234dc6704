"""One generation through the mesh: validate, encode, stream from an executor, detokenize, stop, meter.

``GenerationEngine.generate`` is plain async Python: it takes a ``GenerationInput`` and yields
``Delta``s; the gRPC servicer only converts messages at the edge.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from inferplane.common.catalog import Catalog, CatalogModel
from inferplane.common.errors import InvalidArgument, NotFound, Unavailable
from inferplane.common.server import close_stream
from inferplane.router import metrics
from inferplane.router.admission import Admission, Metadata, Ticket, stamp
from inferplane.router.capacity import Capacity
from inferplane.router.clients import KeyInfo, MeteringClient
from inferplane.router.outbox import UsageOutbox
from inferplane.router.replicas import RETRIES, Replica, ReplicaSet, replica_fault
from inferplane.router.stops import StopMatcher
from inferplane.tokenization import Tokenizer
from inferplane.v1 import common_pb2, executor_pb2, metering_pb2

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
FirstMessage = executor_pb2.ExecutorGenerateResponse | None


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


@dataclass(slots=True)
class Delta:
    text: str
    token_count: int
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # On the final message: what the request cost (None: the model is not priced).
    cost_nanodollars: int | None = None


FINISH_NAMES: dict[int, str] = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
    common_pb2.FINISH_REASON_ERROR: "error",
}


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
            f"has {prompt_tokens} tokens, which leaves no room for a completion.", param="messages")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise InvalidArgument(
            f"This model's maximum context length is {model.context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
            f"completion). Please reduce the prompt or max_tokens.", param="max_tokens")
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
        self._metering = metering
        self.request_timeout_s = request_timeout_s
        self.admission = admission
        self.outbox = outbox
        self._background: set[asyncio.Task[None]] = set()
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
                           param="model")
        return model

    async def generate(self, inp: GenerationInput, *, key: KeyInfo, request_id: str,
                       deadline: float | None = None,
                       on_admitted: Callable[[Metadata], Awaitable[None]] | None = None) -> AsyncGenerator[Delta]:
        """``on_admitted`` receives the rate-limit headers of an admitted request, before any work."""
        model = self.model(inp.model)
        validate(inp, model)
        started = time.monotonic()
        created_at = Timestamp()
        created_at.GetCurrentTime()
        # the caller's deadline, capped by the model's (else the router's) limit for one request
        end = min(deadline or float("inf"), started + (model.request_timeout_s or self.request_timeout_s))
        operation = "chat" if inp.messages is not None else "text_completion"
        span = trace.get_current_span()
        span.set_attributes({"gen_ai.operation.name": operation, "gen_ai.request.model": model.id,
                             "inferplane.request_id": request_id, "inferplane.key_id": key.key_id})
        for attr, value in (("gen_ai.request.max_tokens", inp.max_tokens), ("gen_ai.request.temperature",
                            inp.temperature), ("gen_ai.request.top_p", inp.top_p), ("gen_ai.request.seed", inp.seed)):
            if value is not None:
                span.set_attribute(attr, value)

        def left() -> float:
            return max(0.001, end - time.monotonic())

        if inp.messages is not None:
            encoded = await self.tokenizer.encode_chat(model.id, inp.messages, timeout=left())
        else:
            encoded = await self.tokenizer.encode_text(model.id, inp.prompt or "", timeout=left())
        max_tokens = completion_budget(len(encoded.token_ids), inp.max_tokens, model)
        # Rate limits and budget, before an executor does any work (refusals raise RESOURCE_EXHAUSTED).
        ticket = None
        if self.admission is not None:
            ticket = await self.admission.admit(key, model, len(encoded.token_ids), max_tokens,
                                                request_id=request_id)
        # A slot of the model's bounded queue (Overloaded, answered 503, when it is full or too slow).
        gate = self.capacity.gate(model.id)
        try:
            await gate.acquire(left())
        except BaseException:
            await self._release(ticket)
            raise
        try:
            if on_admitted is not None:
                await on_admitted(ticket.headers if ticket is not None else ())
        except BaseException:
            gate.release()
            await self._release(ticket)
            raise
        req = executor_pb2.ExecutorGenerateRequest(
            model=model.triton_model, prompt_token_ids=encoded.token_ids, max_tokens=max_tokens,
            stop_token_ids=encoded.stop_token_ids, request_id=request_id, stream_interval=model.stream_interval)
        for name in ("temperature", "top_p", "top_k", "seed"):
            value = getattr(inp, name)
            if value is not None:
                setattr(req.sampling, name, value)

        prompt_tokens, completion_tokens = len(encoded.token_ids), 0
        finish: int | None = None
        first_token_at: float | None = None
        last_token_at: float | None = None
        stops = StopMatcher(inp.stop)
        decoder = self.tokenizer.decoder(model.id, timeout=left())
        got_final = False
        streamed = 0  # token ids received from the executor
        pending = 0  # tokens whose text has not been sent yet (an incomplete character, a held stop prefix)
        replica: Replica | None = None
        call: Any = None
        cost: int | None = None
        try:
            replica, call, first = await self._open_stream(model.triton_model, req, left)
            span.set_attribute("inferplane.executor", replica.address)
            async for msg in _chain(first, call):
                if msg.token_ids:
                    if first_token_at is None:
                        first_token_at = time.monotonic()
                        span.add_event("gen_ai.first_token")
                    last_token_at = time.monotonic()
                    completion_tokens += len(msg.token_ids)
                    streamed += len(msg.token_ids)
                    pending += len(msg.token_ids)
                    text = stops.feed(await decoder.push(list(msg.token_ids)))
                    if text:
                        yield Delta(text, pending)
                        pending = 0
                    if stops.matched:
                        finish = common_pb2.FINISH_REASON_STOP
                        break
                if msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    # The model's own counts of what it consumed and produced are authoritative.
                    prompt_tokens, completion_tokens = msg.usage.prompt_tokens, msg.usage.completion_tokens
                    finish = msg.finish_reason
                    got_final = True
                    break
            if finish is None:
                raise Unavailable("the executor ended the stream before the generation finished")
            if not stops.matched:
                tail = stops.feed(await decoder.push([], final=True))
                tail += stops.flush()
                if stops.matched:
                    finish = common_pb2.FINISH_REASON_STOP
                if tail:
                    yield Delta(tail, pending)
                    pending = 0
        except BaseException as exc:
            client_gone = isinstance(exc, asyncio.CancelledError | GeneratorExit)
            finish = common_pb2.FINISH_REASON_CANCELLED if client_gone else common_pb2.FINISH_REASON_ERROR
            raise
        finally:
            # Bookkeeping first, before anything that awaits: a second cancellation arriving while the executor
            # stream is closed must not lose the usage record, the queue slot or the replica's count.
            record = usage_record(request_id, key, model.id, prompt_tokens, completion_tokens,
                                   finish or common_pb2.FINISH_REASON_ERROR, started, first_token_at, created_at)
            if ticket is not None and self.admission is not None:
                cost = self.admission.settle(ticket, prompt_tokens, completion_tokens)
                stamp(record, ticket, cost)  # the record settles the reservation in metering
                cost = cost if ticket.price is not None else None
            outcome = FINISH_NAMES.get(finish or common_pb2.FINISH_REASON_ERROR, "error")
            span.set_attributes({"gen_ai.usage.input_tokens": prompt_tokens,
                                 "gen_ai.usage.output_tokens": completion_tokens,
                                 "gen_ai.response.finish_reasons": [outcome]})
            metrics.observe(model.id, operation, outcome, prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens,
                            ttft_s=None if first_token_at is None else first_token_at - started,
                            duration_s=time.monotonic() - started,
                            last_token_s=None if last_token_at is None else last_token_at - started)
            # The record is written from a task of its own, started before anything here awaits: a cancellation
            # of this request (the caller leaving, even after its generation finished) cannot interrupt it.
            recording = self.record_soon(record)
            try:
                if call is not None:
                    # cancels the executor (and Triton) when the caller left or a stop matched
                    await close_stream(call, cancel=not got_final)
                await _quietly(decoder.close())
            finally:
                if replica is not None:
                    replica.outstanding -= 1
                gate.release()
            if finish in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH):
                # a completed request's usage (and cost) reaches the caller only once its record is stored
                await asyncio.shield(recording)
        assert finish is not None
        # The last message also carries tokens that produced no text (an end-of-turn token the model counts
        # but does not stream), so the token counts of all messages add up to completion_tokens.
        yield Delta("", pending + max(0, completion_tokens - streamed), finish, prompt_tokens, completion_tokens,
                    cost)

    async def _open_stream(self, triton_model: str, req: executor_pb2.ExecutorGenerateRequest,
                           left: Callable[[], float]) -> tuple[Replica, Any, FirstMessage]:
        """Start the executor stream and wait for its first message. A replica fault before that first
        message (nothing has reached the caller yet) is retried once on another replica, within the retry
        budget; after it, failures end the stream. Returns (replica, call, first message or None)."""
        tried: set[str] = set()
        self.executors.budget.on_request()
        while True:
            replica = self.executors.pick(triton_model, exclude=tried)
            replica.outstanding += 1
            call = replica.stub.Generate(req, timeout=left())
            try:
                first = await call.__aiter__().__anext__()
                replica.succeeded()
                return replica, call, first
            except StopAsyncIteration:
                return replica, call, None
            except BaseException as exc:
                replica.outstanding -= 1
                await close_stream(call)
                if not replica_fault(exc):
                    raise
                assert isinstance(exc, grpc.aio.AioRpcError)
                self.executors.failed(replica, exc)
                if tried or not self.executors.budget.try_spend():
                    raise Unavailable(f"executor {replica.address} failed: {exc.code().name}") from exc
                tried.add(replica.address)
                RETRIES.inc()
                log.warning("retrying %s on another replica after %s", req.request_id, exc.code().name)

    async def record(self, record: metering_pb2.UsageRecord, attempts: int = 5) -> None:
        """Store one usage record: durably in the outbox (which replays it to metering), or, without an
        outbox, sent with retries (idempotent on request id)."""
        if self.outbox is not None:
            try:
                await self.outbox.put(record)
                return
            except Exception:
                log.exception("usage outbox write failed for %s; sending directly", record.request_id)
        delay = 0.2
        for attempt in range(1, attempts + 1):
            try:
                await self._metering.record_usage(record, timeout=5.0)
                return
            except grpc.aio.AioRpcError as exc:
                if attempt == attempts or exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    metrics.USAGE_RECORDS_FAILED.inc()
                    log.error("usage record %s not stored after %d attempts: %s", record.request_id,
                              attempt, exc.code().name)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def record_soon(self, record: metering_pb2.UsageRecord) -> asyncio.Task[None]:
        """Start storing ``record`` in a task of its own (held until done; ``drain`` waits for it), so that a
        cancellation of the request that produced it cannot interrupt the write."""
        return self._spawn(self.record(record))

    async def _release(self, ticket: Ticket | None) -> None:
        """Give back a reservation of a request that will leave no usage record (it never ran)."""
        if ticket is not None and self.admission is not None:
            await _quietly(self.admission.release(ticket))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self) -> None:
        """Wait for background usage records (at shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


async def _chain(first: executor_pb2.ExecutorGenerateResponse | None,
                 call: Any) -> AsyncIterator[executor_pb2.ExecutorGenerateResponse]:
    if first is None:
        return
    yield first
    async for msg in call:
        yield msg


async def _quietly(aw: object) -> None:
    try:
        await aw  # type: ignore[misc]
    except Exception:  # closing a stream that already failed is not an error worth raising
        pass


def usage_record(request_id: str, key: KeyInfo, model: str, prompt_tokens: int, completion_tokens: int,
                  finish: int, started: float, first_token_at: float | None,
                  created_at: Timestamp) -> metering_pb2.UsageRecord:
    record = metering_pb2.UsageRecord(
        request_id=request_id, key_id=key.key_id, model=model, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, finish_reason=FINISH_NAMES.get(finish, "error"),
        latency_ms=int((time.monotonic() - started) * 1000), created_at=created_at)
    if first_token_at is not None:
        record.time_to_first_token_ms = int((first_token_at - started) * 1000)
    return record
