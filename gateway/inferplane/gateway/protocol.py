"""OpenAI request models, one per endpoint (vLLM's ``protocol.py`` style), and the bodies built from router messages.

A request model validates what OpenAI validates (ranges, ``n``, ``stop``, tools) and converts itself with
``to_generate_request()``; its ``make_encoder`` turns the router's ``GenerateResponse`` stream back into
``chat.completion`` / ``chat.completion.chunk`` / ``text_completion`` objects. No field is ignored: an unknown
field is a 400 naming it (``extra="forbid"``), and an OpenAI field this server cannot honour (``audio``,
``prediction``, ``store: true``, ...) is refused by name with the reason (docs/api-openai.md lists them all).

Every number is range-checked here, before it reaches a protobuf field (``REQUEST_CONFIG``, ``Count32``): a
protobuf ``int32`` refuses 10**12 with a ``ValueError``, which would surface as a 500, and a float field takes
NaN and infinity silently. Out of range is a 400 naming the ``param``, as OpenAI answers it.

The router streams ``n`` choices interleaved, each message tagged with its choice ``index``; each choice ends
with its own finish message and the last message of all carries the usage. The encoder keeps one ``_Choice``
per index (text, logprobs, tool calls, text offset) and builds the body or the chunks from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from inferplane.common.money import format_usd
from inferplane.common.wire import FINISH_FROM_PB, TIER_FROM_PB, TIER_TO_PB
from inferplane.gateway.errors import CLIENT_CLOSED_REQUEST, SERVER_ERROR, GatewayError
from inferplane.v1 import common_pb2, router_pb2

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 128  # OpenAI's limit on n
MAX_TOP_LOGPROBS = 20  # chat completions' top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # text completions' logprobs
MAX_LOGIT_BIAS = 300  # entries, as OpenAI caps it
MAX_TOOLS = 128
MAX_MODELS = 9  # a request's ``models``: the model and up to 8 fallbacks (the router's limit)
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Every request model: no NaN or infinity in a float field (JSON has no such numbers, but the parser takes the
# literals and an overflowing 1e400); an unknown field is refused by name, never ignored.
REQUEST_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)
# A positive count that a protobuf int32 field holds (max_tokens, dimensions); the router checks it against the
# model's context length.
Count32 = Annotated[int, Field(ge=1, le=INT32_MAX)]
# Roles the router's chat template knows; OpenAI's "developer" is its newer name for "system".
ROLE_ALIASES = {"developer": "system"}
# OpenAI's rule for function and json_schema names.
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# A logprob JSON cannot carry (-inf: a token the constraint masked) is sent as vLLM sends it.
LOGPROB_FLOOR = -9999.0

# Finish reasons that are failures, not results: they become an error answer (or an error frame). The others
# (stop, length, tool_calls) are OpenAI's finish_reason under the same names (``wire.FINISH_FROM_PB``).
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

    ``prompt_tokens_details.cached_tokens`` is the prompt tokens the model reused from its prefix cache (whole
    blocks, docs/prefix-cache.md); the other breakdowns are zero: no model here reasons, hears or predicts."""
    if not msg.HasField("usage"):
        return None
    u = msg.usage
    out: dict[str, Any] = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                           "total_tokens": u.total_tokens,
                           "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "audio_tokens": 0},
                           "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                         "accepted_prediction_tokens": 0,
                                                         "rejected_prediction_tokens": 0}}
    if u.HasField("cost_nanodollars"):
        out["cost"] = format_usd(u.cost_nanodollars)
    return out


def pricing_dict(m: common_pb2.ModelInfo) -> dict[str, Any] | None:
    """The extension ``pricing`` of a ``/v1/models`` entry: exact USD strings; for a model whose service tiers are
    priced apart (its catalog ``tier_multipliers``), ``tiers``: each tier's multiplier and its prices (exact: the
    default price times the multiplier, not rounded: a request's cost is rounded once, to a nano-dollar)."""
    if not m.HasField("pricing"):
        return None
    p = m.pricing
    out: dict[str, Any] = {"currency": "USD", "input_per_million_tokens": format_usd(p.input_per_million_nanodollars),
                           "cached_input_per_million_tokens": format_usd(p.cached_input_per_million_nanodollars),
                           "output_per_million_tokens": format_usd(p.output_per_million_nanodollars),
                           "per_request": format_usd(p.per_request_nanodollars), "version": p.version}
    if not p.tier_multipliers:
        return out  # every tier at this price
    tiers: dict[str, Any] = {"default": {"multiplier": "1", "input_per_million_tokens": out["input_per_million_tokens"],
                                         "cached_input_per_million_tokens": out["cached_input_per_million_tokens"],
                                         "output_per_million_tokens": out["output_per_million_tokens"],
                                         "per_request": out["per_request"]}}
    for tier in ("flex", "priority"):
        multiplier = Decimal(p.tier_multipliers.get(tier, "1"))
        tiers[tier] = {"multiplier": str(multiplier),
                       **{name: _usd_times(nanos, multiplier) for name, nanos in (
                           ("input_per_million_tokens", p.input_per_million_nanodollars),
                           ("cached_input_per_million_tokens", p.cached_input_per_million_nanodollars),
                           ("output_per_million_tokens", p.output_per_million_nanodollars),
                           ("per_request", p.per_request_nanodollars))}}
    out["tiers"] = tiers
    return out


def _usd_times(nanos: int, multiplier: Decimal) -> str:
    """``nanos`` nano-dollars times ``multiplier`` as an exact USD string (no exponent, no trailing zeros)."""
    text = format((Decimal(nanos) * multiplier).scaleb(-9), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def sse_frame(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as compact JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _logprob(value: float) -> float:
    """A float32 logprob as its shortest decimal (-0.01, not -0.009999999776482582); -inf as ``LOGPROB_FLOOR``."""
    return float(repr(np.float32(value))) if math.isfinite(value) else LOGPROB_FLOOR


def chat_logprobs(entries: Iterable[common_pb2.TokenLogprob]) -> dict[str, Any]:
    """Chat's ``choices[i].logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}``."""
    return {"content": [{"token": e.token, "logprob": _logprob(e.logprob), "bytes": list(e.bytes),
                         "top_logprobs": [{"token": t.token, "logprob": _logprob(t.logprob), "bytes": list(t.bytes)}
                                          for t in e.top_logprobs]}
                        for e in entries],
            "refusal": None}


def completion_logprobs(entries: Iterable[common_pb2.TokenLogprob], offset: int) -> tuple[dict[str, Any], int]:
    """Text completions' ``logprobs`` (``tokens``, ``token_logprobs``, ``top_logprobs`` as ``{token: logprob}``,
    ``text_offset`` counted from ``offset``, the characters of the choice's earlier tokens) and the next offset."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e.token)
        out["token_logprobs"].append(_logprob(e.logprob))
        out["top_logprobs"].append({t.token: _logprob(t.logprob) for t in e.top_logprobs})
        out["text_offset"].append(offset)
        offset += len(e.token)
    return out, offset


class _Choice:
    """One choice's state: what the body needs (text, logprobs, calls) and what the stream needs (offset)."""

    __slots__ = ("calls", "finish", "logprobs", "offset", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: list[common_pb2.TokenLogprob] = []
        self.calls: dict[int, dict[str, Any]] = {}  # by the call's index, assembled from its deltas
        self.finish: str | None = None
        self.offset = 0  # characters of the tokens already streamed (completions' text_offset)

    def add_calls(self, deltas: Iterable[router_pb2.ToolCallDelta]) -> None:
        for d in deltas:
            call = self.calls.setdefault(d.index, {"id": "", "type": "function",
                                                   "function": {"name": "", "arguments": ""}})
            if d.id:
                call["id"] = d.id
            if d.name:
                call["function"]["name"] = d.name
            call["function"]["arguments"] += d.arguments


# Stands for the text in a text chunk's serialised template (private-use characters no model id carries).
_TEXT_SENTINEL = "\ue000text\ue000"


class ResponseEncoder:
    """Builds one request's response objects; id, created and model come from the router's first message.

    The body: ``add`` every router message (in stream order), then ``body``. A stream: ``frames`` of each
    message, ``add_finish`` (which keeps no text), and for a finish its ``finish_chunk``; ``done`` after the
    last choice's finish."""

    id_prefix: ClassVar[str]
    object_name: ClassVar[str]
    chunk_object_name: ClassVar[str]

    def __init__(self, first: router_pb2.GenerateResponse, *, n: int = 1, logprobs: bool = False,
                 include_usage: bool = False) -> None:
        self.id = f"{self.id_prefix}{first.request_id}"
        self.created = first.created
        self.model = first.model
        # the tier that serves (OpenAI echoes it); None: the router did not say
        self.service_tier = TIER_FROM_PB.get(first.service_tier) if first.service_tier else None
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.choices = [_Choice() for _ in range(n)]
        self.unfinished = n
        self._text_templates: dict[int, tuple[bytes, bytes]] = {}

    @property
    def done(self) -> bool:
        """Every choice has its finish."""
        return self.unfinished == 0

    def choice(self, msg: router_pb2.GenerateResponse) -> _Choice:
        if not 0 <= msg.index < len(self.choices):
            raise GatewayError(500, f"The generation sent choice {msg.index} of {len(self.choices)}.",
                               type=SERVER_ERROR)
        return self.choices[msg.index]

    def add_finish(self, msg: router_pb2.GenerateResponse, finish: str | None) -> _Choice:
        """Count ``msg``'s finish (``finish_reason(msg)``); a message for a choice that has ended is the router's
        fault."""
        choice = self.choice(msg)
        if choice.finish is not None:
            raise GatewayError(500, f"The generation sent choice {msg.index} after its finish.", type=SERVER_ERROR)
        if finish is not None:
            choice.finish = finish
            self.unfinished -= 1
        return choice

    def add(self, msg: router_pb2.GenerateResponse, finish: str | None) -> None:
        """Keep ``msg``'s text, logprobs and tool calls for the body, and count its finish."""
        choice = self.add_finish(msg, finish)
        choice.text.append(msg.text)
        choice.logprobs.extend(msg.logprobs)
        choice.add_calls(msg.tool_calls)

    def frames(self, msg: router_pb2.GenerateResponse) -> bytes:
        """The SSE frames of ``msg``'s text, logprobs and tool calls (none for an empty message): plain text
        takes the serialised-once template (the hot path); the rest a whole chunk."""
        self.choice(msg)
        if msg.logprobs or msg.tool_calls:
            return sse_frame(self.content_chunk(msg))
        return self.text_frame(msg.text, msg.index) if msg.text else b""

    def text_frame(self, text: str, index: int = 0) -> bytes:
        """``sse_frame(self.text_chunk(text, index))``, without serialising the same envelope for every chunk: the
        chunk is serialised once per choice around a sentinel and only the text is encoded per chunk."""
        template = self._text_templates.get(index)
        if template is None:
            marker = sse_frame(_TEXT_SENTINEL)[len(b"data: "):-2]
            parts = sse_frame(self.text_chunk(_TEXT_SENTINEL, index)).split(marker)
            if len(parts) != 2:
                return sse_frame(self.text_chunk(text, index))
            template = self._text_templates[index] = (parts[0], parts[1])
        head, tail = template
        return head + json.dumps(text, ensure_ascii=False).encode() + tail

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if self.service_tier is not None:
            out["service_tier"] = self.service_tier
        return out

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        out = self._envelope(self.chunk_object_name, [choice])
        if self.include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the last
        return out

    def body(self, usage: dict[str, Any] | None) -> dict[str, Any]:
        """The whole answer: every choice, in index order."""
        out = self._envelope(self.object_name, [self._final_choice(i, c) for i, c in enumerate(self.choices)])
        if usage is not None:
            out["usage"] = usage
        return out

    def opening(self) -> list[dict[str, Any]]:
        """Chunks sent before any text."""
        return []

    def usage_chunk(self, usage: dict[str, Any] | None) -> dict[str, Any]:
        out = self._envelope(self.chunk_object_name, [])
        out["usage"] = usage
        return out

    def _final_choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        raise NotImplementedError

    def text_chunk(self, text: str, index: int = 0) -> dict[str, Any]:
        raise NotImplementedError

    def content_chunk(self, msg: router_pb2.GenerateResponse) -> dict[str, Any]:
        raise NotImplementedError

    def finish_chunk(self, finish: str, index: int = 0) -> dict[str, Any]:
        raise NotImplementedError


def _tool_call_delta(d: router_pb2.ToolCallDelta) -> dict[str, Any]:
    """A streamed ``delta.tool_calls`` entry: the call's first delta has its id, type and name."""
    if d.id or d.name:
        return {"index": d.index, "id": d.id, "type": "function",
                "function": {"name": d.name, "arguments": d.arguments}}
    return {"index": d.index, "function": {"arguments": d.arguments}}


class ChatCompletionEncoder(ResponseEncoder):
    id_prefix = "chatcmpl-"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _final_choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        text = "".join(choice.text)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if choice.calls:
            message["tool_calls"] = [choice.calls[k] for k in sorted(choice.calls)]
            if not text:
                message["content"] = None
        logprobs = chat_logprobs(choice.logprobs) if self.logprobs else None
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish}

    def _delta(self, index: int, delta: dict[str, Any], finish: str | None = None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._chunk({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})

    def opening(self) -> list[dict[str, Any]]:
        return [self._delta(i, {"role": "assistant", "content": ""}) for i in range(len(self.choices))]

    def text_chunk(self, text: str, index: int = 0) -> dict[str, Any]:
        return self._delta(index, {"content": text})

    def content_chunk(self, msg: router_pb2.GenerateResponse) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if msg.text or not msg.tool_calls:
            delta["content"] = msg.text
        if msg.tool_calls:
            delta["tool_calls"] = [_tool_call_delta(d) for d in msg.tool_calls]
        logprobs = chat_logprobs(msg.logprobs) if msg.logprobs else None
        return self._delta(msg.index, delta, logprobs=logprobs)

    def finish_chunk(self, finish: str, index: int = 0) -> dict[str, Any]:
        return self._delta(index, {}, finish)


class TextCompletionEncoder(ResponseEncoder):
    id_prefix = "cmpl-"
    object_name = "text_completion"
    chunk_object_name = "text_completion"  # OpenAI streams the same object for completions

    def _final_choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        logprobs = completion_logprobs(choice.logprobs, 0)[0] if self.logprobs else None
        return {"index": index, "text": "".join(choice.text), "logprobs": logprobs, "finish_reason": choice.finish}

    def text_chunk(self, text: str, index: int = 0) -> dict[str, Any]:
        return self._chunk({"index": index, "text": text, "logprobs": None, "finish_reason": None})

    def content_chunk(self, msg: router_pb2.GenerateResponse) -> dict[str, Any]:
        choice = self.choice(msg)
        logprobs, choice.offset = completion_logprobs(msg.logprobs, choice.offset)
        return self._chunk({"index": msg.index, "text": msg.text, "logprobs": logprobs, "finish_reason": None})

    def finish_chunk(self, finish: str, index: int = 0) -> dict[str, Any]:
        return self._chunk({"index": index, "text": "", "logprobs": None, "finish_reason": finish})


# ModelInfo.state -> the extension ``state`` of a /v1/models entry (left out while no executor has said)
MODEL_STATES = {common_pb2.MODEL_STATE_LOADED: "loaded", common_pb2.MODEL_STATE_UNLOADED: "unloaded",
                common_pb2.MODEL_STATE_LOADING: "loading", common_pb2.MODEL_STATE_UNLOADING: "unloading",
                common_pb2.MODEL_STATE_FAILED: "failed"}


def models_body(resp: router_pb2.ListModelsResponse) -> dict[str, Any]:
    """OpenAI's ``GET /v1/models`` list, each entry with the extensions ``context_length`` (prompt plus completion
    tokens, the name vLLM's ``max_model_len`` goes by at OpenRouter and others) and ``state`` (scale to zero:
    ``loaded``, ``loading``, ``unloaded``; docs/model-control.md)."""
    data = []
    for m in resp.models:
        entry: dict[str, Any] = {"id": m.id, "object": "model", "created": m.created,
                                 "owned_by": m.owned_by or "inferplane", "context_length": m.context_length}
        pricing = pricing_dict(m)
        if pricing is not None:
            entry["pricing"] = pricing
        if m.state in MODEL_STATES:
            entry["state"] = MODEL_STATES[m.state]
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
        raise ValueError("expected a string or a list holding exactly one string (several prompts and token ids "
                         "are not supported)")
    return value


def refuse(why: str, *, allowed: Iterable[Any] = ()) -> BeforeValidator:
    """An OpenAI field this server cannot honour: ``null`` (and the ``allowed`` values, which change nothing)
    pass, anything else is a 400 naming the field with ``why``."""
    ok = [None, *allowed]

    def check(value: Any) -> Any:
        if any(value == a and type(value) is type(a) for a in ok):
            return value
        raise ValueError(why)

    return BeforeValidator(check)


def _only_on(role: str, value: Any, info: ValidationInfo) -> Any:
    if value is not None and info.data.get("role") != role:
        raise ValueError(f"'{info.field_name}' is only allowed on '{role}' messages")
    return value


class FunctionCallParam(BaseModel):
    model_config = REQUEST_CONFIG

    name: str
    arguments: str


class ToolCallParam(BaseModel):
    """A call an earlier assistant message made."""

    model_config = REQUEST_CONFIG

    id: str
    type: Literal["function"]
    function: FunctionCallParam

    def to_pb(self) -> common_pb2.ToolCall:
        return common_pb2.ToolCall(id=self.id, name=self.function.name, arguments=self.function.arguments)


class ChatMessageParam(BaseModel):
    model_config = REQUEST_CONFIG

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | None, BeforeValidator(_join_text_parts)] = None
    name: str | None = None
    # assistant: the calls it made (its content may then be null); tool: the call it answers.
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = Field(None, validate_default=True)
    # What the SDKs send back when a response's message is appended to the conversation: null only.
    refusal: Annotated[Any, refuse("a refusal in an earlier message is not supported")] = None
    function_call: Annotated[Any, refuse("'function_call' is deprecated and not supported; use 'tool_calls'")] = None
    audio: Annotated[Any, refuse("audio is not supported")] = None

    @field_validator("tool_calls")
    @classmethod
    def _made_by_assistant(cls, value: list[ToolCallParam] | None, info: ValidationInfo) -> Any:
        return _only_on("assistant", value, info)

    @field_validator("tool_call_id")
    @classmethod
    def _answers_a_call(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and value is None:
            raise ValueError("'tool_call_id' is required on 'tool' messages")
        return _only_on("tool", value, info)

    def to_pb(self) -> common_pb2.ChatMessage:
        msg = common_pb2.ChatMessage(role=ROLE_ALIASES.get(self.role, self.role), content=self.content or "",
                                     tool_calls=[c.to_pb() for c in self.tool_calls or ()])
        if self.name is not None:
            msg.name = self.name
        if self.tool_call_id is not None:
            msg.tool_call_id = self.tool_call_id
        return msg


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG

    include_usage: bool | None = None
    include_obfuscation: Annotated[Any, refuse("stream obfuscation is not supported", allowed=[False])] = None


class FunctionParam(BaseModel):
    model_config = REQUEST_CONFIG

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(BaseModel):
    """A function the model may call (``type: "custom"`` tools are refused by the literal)."""

    model_config = REQUEST_CONFIG

    type: Literal["function"]
    function: FunctionParam

    def to_pb(self) -> common_pb2.FunctionTool:
        f = self.function
        return common_pb2.FunctionTool(name=f.name, description=f.description or "", strict=bool(f.strict),
                                       parameters="" if f.parameters is None else json.dumps(f.parameters))


class JsonSchemaParam(BaseModel):
    model_config = REQUEST_CONFIG

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    # The text is always decoded under the schema: strict or not, it follows it.
    strict: bool | None = None


class ResponseFormatParam(BaseModel):
    model_config = REQUEST_CONFIG

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaParam | None = Field(None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_iff_json_schema(cls, value: JsonSchemaParam | None, info: ValidationInfo) -> JsonSchemaParam | None:
        kind = info.data.get("type")
        if kind == "json_schema" and value is None:
            raise ValueError("'json_schema' is required when 'type' is 'json_schema'")
        if kind != "json_schema" and value is not None:
            raise ValueError("'json_schema' is only allowed when 'type' is 'json_schema'")
        return value

    def to_pb(self) -> common_pb2.Constraint | None:
        if self.type == "json_schema" and self.json_schema is not None and self.json_schema.schema_ is not None:
            return common_pb2.Constraint(json_schema=json.dumps(self.json_schema.schema_))
        if self.type in ("json_object", "json_schema"):  # a json_schema without a schema: any JSON object
            return common_pb2.Constraint(json_object=True)
        return None


TOOL_CHOICE_MODES = {"none": router_pb2.ToolChoice.MODE_NONE, "auto": router_pb2.ToolChoice.MODE_AUTO,
                     "required": router_pb2.ToolChoice.MODE_REQUIRED}


def _tool_choice(value: Any) -> Any:
    """``"none"``, ``"auto"``, ``"required"`` or ``{"type": "function", "function": {"name": ...}}`` (kept as
    the name)."""
    if value is None or (isinstance(value, str) and value in TOOL_CHOICE_MODES):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and set(value) == {"type", "function"}:
        function = value["function"]
        if isinstance(function, dict) and set(function) == {"name"} and isinstance(function["name"], str):
            return {"function": function["name"]}
    raise ValueError("expected 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}} "
                     "(allowed_tools and custom tools are not supported)")


def _logit_bias(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} entries are allowed, got {len(value)}")
    out: dict[int, Any] = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) <= INT64_MAX):
            raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
        out[int(key)] = bias
    return out


Penalty = Annotated[float, Field(ge=-2, le=2)]
Bias = Annotated[float, Field(ge=-100, le=100)]


class GenerationRequest(BaseModel):
    """Fields chat and text completions share. Field order matters: a validator sees the fields above it
    (``stream`` before ``stream_options``, ``n`` before ``best_of``)."""

    model_config = REQUEST_CONFIG
    # Builds this endpoint's response objects.
    encoder: ClassVar[type[ResponseEncoder]]

    model: str = Field(min_length=1)
    # OpenRouter's fallback list: the models to try in order (``model``, when given and not listed, first); the
    # next is tried only when one cannot serve now, before any output (docs/router.md). ``model`` may be left out.
    models: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1, max_length=MAX_MODELS)
    fallbacks: Annotated[Any, refuse("fallbacks are given as OpenRouter's 'models' list here")] = None
    max_tokens: Count32 | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Annotated[list[str] | None, BeforeValidator(_stop_list)] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[int, Bias] | None, BeforeValidator(_logit_bias)] = None
    # An end-user id: OpenAI's abuse monitoring; here it keeps a user on one version of a model that splits its
    # traffic (a canary, docs/catalog.md). safety_identifier is accepted and not used.
    user: str | None = None
    safety_identifier: str | None = Field(None, max_length=64)
    # vLLM's sampling extensions (what load generators send).
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)  # -1 or 0: off
    min_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    ignore_eos: bool | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    # OpenAI's response_format; vLLM takes it on completions too.
    response_format: ResponseFormatParam | None = None
    # OpenAI's tiers: the router's queue serves priority before default before flex, and sheds flex first (429);
    # each tier has its price (docs/router.md). "auto" is "default".
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("'stream_options' is only allowed when 'stream' is true")
        return options

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def choice_count(self) -> int:
        return self.n or 1

    @property
    def wants_logprobs(self) -> bool:
        return False

    def effective_max_tokens(self) -> int | None:
        return self.max_tokens

    def make_encoder(self, first: router_pb2.GenerateResponse) -> ResponseEncoder:
        return self.encoder(first, n=self.choice_count, logprobs=self.wants_logprobs,
                            include_usage=self.include_usage)

    def to_generate_request(self) -> router_pb2.GenerateRequest:
        raise NotImplementedError

    def _check(self) -> None:
        """Rules across fields of the base and a subclass (a validator sees only the fields above it)."""
        max_tokens = self.effective_max_tokens()
        if self.min_tokens is not None and max_tokens is not None and self.min_tokens > max_tokens:
            raise invalid("min_tokens", f"must be at most max_tokens ({max_tokens}), got {self.min_tokens}")

    @model_validator(mode="before")
    @classmethod
    def _model_from_models(cls, data: Any) -> Any:
        """``models`` without ``model``: the first of ``models`` is the model."""
        if isinstance(data, dict) and "model" not in data and isinstance(data.get("models"), list) \
                and data["models"] and isinstance(data["models"][0], str):
            return {**data, "model": data["models"][0]}
        return data

    def _generate_request(self) -> router_pb2.GenerateRequest:
        self._check()
        req = router_pb2.GenerateRequest(model=self.model, stop=self.stop or [], include_usage=self.include_usage,
                                         user=self.user or "")
        req.fallback_models.extend(dict.fromkeys(m for m in self.models or () if m != self.model))
        if self.service_tier is not None:
            tier = "default" if self.service_tier == "auto" else self.service_tier
            req.service_tier = TIER_TO_PB[tier]
        max_tokens = self.effective_max_tokens()
        if max_tokens is not None:
            req.max_tokens = max_tokens
        if self.choice_count != 1:
            req.n = self.choice_count
        s = req.sampling
        for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                setattr(s, name, value)
        if self.top_k is not None and self.top_k > 0:
            s.top_k = self.top_k
        if self.min_tokens:
            s.min_tokens = self.min_tokens
        s.ignore_eos = bool(self.ignore_eos)
        for token, bias in (self.logit_bias or {}).items():
            s.logit_bias[token] = bias
        constraint = self.response_format.to_pb() if self.response_format is not None else None
        if constraint is not None:
            req.constraint.CopyFrom(constraint)
        return req


def invalid(param: str, why: str) -> GatewayError:
    """A 400 naming ``param``, worded as a validation error is."""
    return GatewayError(400, f"Invalid '{param}': {why}", param=param)


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    encoder: ClassVar[type[ResponseEncoder]] = ChatCompletionEncoder

    messages: list[ChatMessageParam] = Field(min_length=1)
    # OpenAI's newer name for max_tokens; wins when both are given.
    max_completion_tokens: Count32 | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolParam] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Annotated[Any, BeforeValidator(_tool_choice)] = None
    parallel_tool_calls: bool | None = None
    # Accepted and not used (OpenAI keeps them only with store, which is refused).
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    store: Annotated[Any, refuse("stored completions are not supported", allowed=[False])] = None
    # A hint for OpenAI's prompt cache routing; nothing here is cached, so it changes nothing.
    prompt_cache_key: str | None = None
    modalities: Annotated[Any, refuse("only the 'text' modality is supported", allowed=[["text"]])] = None
    audio: Annotated[Any, refuse("audio output is not supported")] = None
    prediction: Annotated[Any, refuse("predicted outputs are not supported")] = None
    web_search_options: Annotated[Any, refuse("web search is not supported")] = None
    reasoning_effort: Annotated[Any, refuse("no model here reasons; reasoning_effort is not supported")] = None
    verbosity: Annotated[Any, refuse("verbosity is not supported")] = None
    moderation: Annotated[Any, refuse("moderation is not supported")] = None
    prompt_cache_retention: Annotated[Any, refuse("prompt caching is not supported")] = None
    prompt_cache_options: Annotated[Any, refuse("prompt caching is not supported")] = None
    functions: Annotated[Any, refuse("'functions' is deprecated and not supported; use 'tools'")] = None
    function_call: Annotated[Any, refuse("'function_call' is deprecated and not supported; use 'tool_choice'")] = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("'top_logprobs' requires 'logprobs' to be true")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[ToolParam] | None) -> list[ToolParam] | None:
        names = [t.function.name for t in tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("function names must be unique")
        return tools

    @field_validator("tool_choice", "parallel_tool_calls")
    @classmethod
    def _needs_tools(cls, value: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools")
        if value is None or value == "none" or tools:
            if isinstance(value, dict) and value["function"] not in {t.function.name for t in tools or ()}:
                raise ValueError(f"no function named {value['function']!r} in 'tools'")
            return value
        raise ValueError(f"'{info.field_name}' is only allowed when 'tools' are specified")

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_generate_request(self) -> router_pb2.GenerateRequest:
        req = self._generate_request()
        req.chat.messages.extend(m.to_pb() for m in self.messages)
        if self.logprobs:
            req.logprobs = True
            if self.top_logprobs:
                req.top_logprobs = self.top_logprobs
        req.tools.extend(t.to_pb() for t in self.tools or ())
        if isinstance(self.tool_choice, dict):
            req.tool_choice.mode = router_pb2.ToolChoice.MODE_FUNCTION
            req.tool_choice.function_name = self.tool_choice["function"]
        elif self.tool_choice is not None:
            req.tool_choice.mode = TOOL_CHOICE_MODES[self.tool_choice]
        if self.parallel_tool_calls is not None:
            req.parallel_tool_calls = self.parallel_tool_calls
        return req


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions`` (legacy text completions)."""

    encoder: ClassVar[type[ResponseEncoder]] = TextCompletionEncoder

    prompt: Annotated[str, BeforeValidator(_single_prompt)]
    # The most likely alternatives to return at each position (0: the chosen tokens' logprobs only).
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: Annotated[Any, refuse("echo is not supported", allowed=[False])] = None
    suffix: Annotated[Any, refuse("suffix (insertion) is not supported")] = None
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n") or 1
        if value is not None and value != n:
            raise ValueError(f"only best_of equal to n ({n}) is supported (no server-side ranking)")
        return value

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def to_generate_request(self) -> router_pb2.GenerateRequest:
        req = self._generate_request()
        req.prompt = self.prompt
        if self.logprobs is not None:
            req.logprobs = True
            if self.logprobs:
                req.top_logprobs = self.logprobs
        return req
