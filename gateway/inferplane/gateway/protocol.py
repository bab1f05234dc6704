"""OpenAI request models, one per endpoint (vLLM's ``protocol.py`` style), and the bodies built from router messages.

A request model validates what OpenAI validates (ranges, ``n``, ``stop``) and converts itself with
``to_generate_request()``; its ``encoder`` turns the router's ``GenerateResponse`` stream back into
``chat.completion`` / ``chat.completion.chunk`` / ``text_completion`` objects. Unknown fields are ignored.

Every number is range-checked here, before it reaches a protobuf field (``REQUEST_CONFIG``, ``Count32``): a
protobuf ``int32`` refuses 10**12 with a ``ValueError``, which would surface as a 500, and a float field takes
NaN and infinity silently. Out of range is a 400 naming the ``param``, as OpenAI answers it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from inferplane.common.money import format_usd
from inferplane.common.wire import FINISH_FROM_PB
from inferplane.gateway.errors import CLIENT_CLOSED_REQUEST, SERVER_ERROR, GatewayError
from inferplane.v1 import common_pb2, router_pb2

MAX_STOP_SEQUENCES = 4
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Every request model: no NaN or infinity in a float field (JSON has no such numbers, but the parser takes the
# literals and an overflowing 1e400); unknown fields are ignored.
REQUEST_CONFIG = ConfigDict(extra="ignore", allow_inf_nan=False)
# A positive count that a protobuf int32 field holds (max_tokens, dimensions); the router checks it against the
# model's context length.
Count32 = Annotated[int, Field(ge=1, le=INT32_MAX)]
# Roles the router's chat template knows; OpenAI's "developer" is its newer name for "system".
ROLE_ALIASES = {"developer": "system"}

# Finish reasons that are failures, not results: they become an error answer (or an error frame). The others
# (stop, length) are OpenAI's finish_reason under the same names (``wire.FINISH_FROM_PB``).
FAILED_FINISHES: dict[int, GatewayError] = {
    common_pb2.FINISH_REASON_CANCELLED: GatewayError(CLIENT_CLOSED_REQUEST, "The request was cancelled.",
                                                     code="request_cancelled"),
    common_pb2.FINISH_REASON_ERROR: GatewayError(500, "The generation failed.", type=SERVER_ERROR),
}


# --- response bodies ----------------------------------------------------------------------------------

def finish_reason(msg: router_pb2.GenerateResponse) -> str | None:
    """OpenAI's finish_reason of a router message: None while generating; raises for a failed finish."""
    failed = FAILED_FINISHES.get(msg.finish_reason)
    if failed is not None:
        raise GatewayError(failed.status, failed.message, type=failed.type, code=failed.code)
    return FINISH_FROM_PB.get(msg.finish_reason)


def usage_dict(msg: router_pb2.GenerateResponse) -> dict[str, Any] | None:
    """OpenAI's ``usage``, with both breakdowns always present (as OpenAI sends them: clients read
    ``prompt_tokens_details.cached_tokens`` without a guard), plus the extension ``cost``: exact USD as a string
    ("0.000123") when the request was priced (the router's ``cost_nanodollars``).

    The breakdowns are zero: nothing is cached until prefix caching exists, and no model here reasons, hears or
    predicts."""
    if not msg.HasField("usage"):
        return None
    u = msg.usage
    out: dict[str, Any] = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                           "total_tokens": u.total_tokens,
                           "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                           "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                         "accepted_prediction_tokens": 0,
                                                         "rejected_prediction_tokens": 0}}
    if u.HasField("cost_nanodollars"):
        out["cost"] = format_usd(u.cost_nanodollars)
    return out


def pricing_dict(m: common_pb2.ModelInfo) -> dict[str, Any] | None:
    """The extension ``pricing`` of a ``/v1/models`` entry: exact USD strings."""
    if not m.HasField("pricing"):
        return None
    p = m.pricing
    return {"currency": "USD", "input_per_million_tokens": format_usd(p.input_per_million_nanodollars),
            "output_per_million_tokens": format_usd(p.output_per_million_nanodollars),
            "per_request": format_usd(p.per_request_nanodollars), "version": p.version}


def sse_frame(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as compact JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


# Stands for the text in a text chunk's serialised template (private-use characters no model id carries).
_TEXT_SENTINEL = "\ue000text\ue000"


class ResponseEncoder:
    """Builds one request's response objects; id, created and model come from the router's first message."""

    id_prefix: ClassVar[str]
    object_name: ClassVar[str]
    chunk_object_name: ClassVar[str]

    def __init__(self, first: router_pb2.GenerateResponse, *, include_usage: bool = False) -> None:
        self.id = f"{self.id_prefix}{first.request_id}"
        self.created = first.created
        self.model = first.model
        self.include_usage = include_usage
        self._text_template: tuple[bytes, bytes] | None = None

    def text_frame(self, text: str) -> bytes:
        """``sse_frame(self.text_chunk(text))``, without serialising the same envelope for every chunk: the
        chunk is serialised once around a sentinel and only the text is encoded per chunk."""
        if self._text_template is None:
            marker = sse_frame(_TEXT_SENTINEL)[len(b"data: "):-2]
            parts = sse_frame(self.text_chunk(_TEXT_SENTINEL)).split(marker)
            if len(parts) != 2:
                return sse_frame(self.text_chunk(text))
            self._text_template = (parts[0], parts[1])
        head, tail = self._text_template
        return head + json.dumps(text, ensure_ascii=False).encode() + tail

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        out = self._envelope(self.chunk_object_name, [choice])
        if self.include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the last
        return out

    def body(self, text: str, finish: str, usage: dict[str, int] | None) -> dict[str, Any]:
        out = self._envelope(self.object_name, [self._final_choice(text, finish)])
        if usage is not None:
            out["usage"] = usage
        return out

    def opening(self) -> list[dict[str, Any]]:
        """Chunks sent before any text."""
        return []

    def usage_chunk(self, usage: dict[str, int] | None) -> dict[str, Any]:
        out = self._envelope(self.chunk_object_name, [])
        out["usage"] = usage
        return out

    def _final_choice(self, text: str, finish: str) -> dict[str, Any]:
        raise NotImplementedError

    def text_chunk(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def finish_chunk(self, finish: str) -> dict[str, Any]:
        raise NotImplementedError


class ChatCompletionEncoder(ResponseEncoder):
    id_prefix = "chatcmpl-"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _final_choice(self, text: str, finish: str) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None, "finish_reason": finish}

    def _delta(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish})

    def opening(self) -> list[dict[str, Any]]:
        return [self._delta({"role": "assistant", "content": ""})]

    def text_chunk(self, text: str) -> dict[str, Any]:
        return self._delta({"content": text})

    def finish_chunk(self, finish: str) -> dict[str, Any]:
        return self._delta({}, finish)


class TextCompletionEncoder(ResponseEncoder):
    id_prefix = "cmpl-"
    object_name = "text_completion"
    chunk_object_name = "text_completion"  # OpenAI streams the same object for completions

    def _final_choice(self, text: str, finish: str) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def text_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": None})

    def finish_chunk(self, finish: str) -> dict[str, Any]:
        return self._chunk({"index": 0, "text": "", "logprobs": None, "finish_reason": finish})


def models_body(resp: router_pb2.ListModelsResponse) -> dict[str, Any]:
    """OpenAI's ``GET /v1/models`` list, each entry with the extension ``context_length`` (prompt plus completion
    tokens, the name vLLM's ``max_model_len`` goes by at OpenRouter and others)."""
    data = []
    for m in resp.models:
        entry: dict[str, Any] = {"id": m.id, "object": "model", "created": m.created,
                                 "owned_by": m.owned_by or "inferplane", "context_length": m.context_length}
        pricing = pricing_dict(m)
        if pricing is not None:
            entry["pricing"] = pricing
        data.append(entry)
    return {"object": "list", "data": data}


# --- request models -----------------------------------------------------------------------------------

def _join_text_parts(value: Any) -> Any:
    """Content is a string, or a list of ``{"type": "text", "text": ...}`` parts that are joined."""
    if not isinstance(value, list):
        return value
    texts: list[str] = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        texts.append(part["text"])
    return "".join(texts)


def _stop_list(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return None if value is None else [value]
    if isinstance(value, list) and len(value) <= MAX_STOP_SEQUENCES and all(isinstance(s, str) for s in value):
        return value
    raise ValueError(f"expected a string or a list of at most {MAX_STOP_SEQUENCES} strings")


def _single_prompt(value: Any) -> Any:
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], str):
            return value[0]
        raise ValueError("expected a string or a list holding exactly one string (token ids are not supported)")
    return value


class ChatMessageParam(BaseModel):
    model_config = REQUEST_CONFIG

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | None, BeforeValidator(_join_text_parts)] = None
    name: str | None = None

    def to_pb(self) -> common_pb2.ChatMessage:
        msg = common_pb2.ChatMessage(role=ROLE_ALIASES.get(self.role, self.role), content=self.content or "")
        if self.name is not None:
            msg.name = self.name
        return msg


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG

    include_usage: bool | None = None


class GenerationRequest(BaseModel):
    """Fields chat and text completions share. Field order matters: ``stream`` before ``stream_options``."""

    model_config = REQUEST_CONFIG
    # Builds this endpoint's response objects.
    encoder: ClassVar[type[ResponseEncoder]]

    model: str = Field(min_length=1)
    max_tokens: Count32 | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Annotated[list[str] | None, BeforeValidator(_stop_list)] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Count32 | None = 1
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("'stream_options' is only allowed when 'stream' is true")
        return options

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def effective_max_tokens(self) -> int | None:
        return self.max_tokens

    def to_generate_request(self) -> router_pb2.GenerateRequest:
        raise NotImplementedError

    def _generate_request(self) -> router_pb2.GenerateRequest:
        req = router_pb2.GenerateRequest(model=self.model, stop=self.stop or [], include_usage=self.include_usage)
        max_tokens = self.effective_max_tokens()
        if max_tokens is not None:
            req.max_tokens = max_tokens
        for name in ("temperature", "top_p", "seed"):
            value = getattr(self, name)
            if value is not None:
                setattr(req.sampling, name, value)
        return req


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    encoder: ClassVar[type[ResponseEncoder]] = ChatCompletionEncoder

    messages: list[ChatMessageParam] = Field(min_length=1)
    # OpenAI's newer name for max_tokens; wins when both are given.
    max_completion_tokens: Count32 | None = None

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_generate_request(self) -> router_pb2.GenerateRequest:
        req = self._generate_request()
        req.chat.messages.extend(m.to_pb() for m in self.messages)
        return req


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions`` (legacy text completions)."""

    encoder: ClassVar[type[ResponseEncoder]] = TextCompletionEncoder

    prompt: Annotated[str, BeforeValidator(_single_prompt)]
    echo: bool | None = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool | None) -> bool | None:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    def to_generate_request(self) -> router_pb2.GenerateRequest:
        req = self._generate_request()
        req.prompt = self.prompt
        return req
