"""The Responses API's request (``POST /v1/responses``): its model, its refusals, its ``GenerateRequest``.

``ResponsesRequest`` converts itself to the ``GenerateRequest`` a chat completion sends: ``instructions`` as the
first system message, then the input items as chat messages (a ``function_call`` item as a tool call on the
assistant turn, a ``function_call_output`` item as a ``tool`` message), the function tools, the tool choice, and
``text.format`` as the decoding constraint. Every field is honoured or refused with a 400 naming it (``param``):
unknown fields, built-in tools, reasoning and non-text content are refused, never dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError

from inferplane.gateway.errors import GatewayError, param_from_loc
from inferplane.gateway.protocol import INT32_MAX, ROLE_ALIASES
from inferplane.v1 import common_pb2, router_pb2

# Fields of OpenAI's CreateResponse this server does not implement: null is accepted (it means "not set"),
# any other value is a 400 naming the field.
UNSUPPORTED_FIELDS = frozenset({"background", "conversation", "context_management", "include", "max_tool_calls",
                                "moderation", "prompt", "prompt_cache_key", "prompt_cache_retention", "reasoning",
                                "safety_identifier", "service_tier", "stream_options", "top_logprobs",
                                "truncation"})
ITEM_TYPES = ("message", "function_call", "function_call_output")
TEXT_PARTS = ("input_text", "output_text")
# Defaults echoed when the request leaves them out (the router's: temperature 1, top_p 1).
DEFAULT_SAMPLING = 1.0

STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


# --- errors -----------------------------------------------------------------------------------------------

def _param(loc: Iterable[int | str]) -> str | None:
    """A pydantic location as OpenAI's ``param`` (``input[0].content``), without the names pydantic gives union
    members (``str``, ``list[...]``, ``function-after[...]``) and discriminator tags, which are no fields."""
    return param_from_loc(p for p in loc if not (isinstance(p, str) and (p in ("str", *ITEM_TYPES) or "[" in p)))


def _invalid(param: str | None, message: str) -> GatewayError:
    return GatewayError(400, message, param=param)


def from_validation(exc: ValidationError) -> GatewayError:
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        return _invalid(None, "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                              "using your HTTP library correctly. The OpenAI API expects a JSON payload.)")
    # The first field's deepest error: a union (string or parts) reports one error per member, and the one inside
    # the parts says more than "Input should be a valid string".
    first = max((e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]), key=lambda e: len(e["loc"]))
    param = _param(first["loc"])
    if first["type"] == "missing":
        return _invalid(param, f"Missing required parameter: '{param}'.")
    if first["type"] == "extra_forbidden":
        return _invalid(param, f"Unknown parameter: '{param}'.")
    return _invalid(param, f"Invalid '{param}': {str(first['msg']).removeprefix('Value error, ')}")


# --- request ----------------------------------------------------------------------------------------------

def _text_content(value: Any) -> Any:
    """Content is a string or a list of text parts; any other part type is refused by name."""
    if isinstance(value, list):
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in TEXT_PARTS:
                raise ValueError(f"content parts of type {kind!r} are not supported (only 'input_text' and "
                                 "'output_text')")
    return value


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["input_text", "output_text"]
    text: str
    # What an output_text part carries when a previous response's output is sent back as input: describes that
    # output, says nothing to the model (only the text does).
    annotations: list[dict[str, Any]] | None = None
    logprobs: list[dict[str, Any]] | None = None


Content = Annotated[str | list[TextPart], BeforeValidator(_text_content)]


def _joined(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class MessageItem(BaseModel):
    model_config = STRICT

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Content
    id: str | None = None  # set on an output message sent back as input
    status: ItemStatus | None = None


class FunctionCallItem(BaseModel):
    model_config = STRICT

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = STRICT

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: Content
    id: str | None = None
    status: ItemStatus | None = None


def _item_type(value: Any) -> str | None:
    return value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)


def _known_item(value: Any) -> Any:
    if not isinstance(value, dict | BaseModel):
        raise ValueError("expected an input item (an object)")
    kind = _item_type(value)
    if isinstance(value, dict) and kind not in ITEM_TYPES:
        raise ValueError(f"input items of type {kind!r} are not supported (only {', '.join(map(repr, ITEM_TYPES))})")
    return value


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type), BeforeValidator(_known_item)]


def _function_tool(value: Any) -> Any:
    kind = value.get("type") if isinstance(value, dict) else None
    if isinstance(value, dict) and kind != "function":
        raise ValueError(f"tools of type {kind!r} are not supported (only 'function')")
    return value


class FunctionToolParam(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # absent means true (the Responses API's default, unlike chat completions')

    def to_pb(self) -> common_pb2.FunctionTool:
        return common_pb2.FunctionTool(name=self.name, description=self.description or "",
                                       parameters=json.dumps(self.parameters) if self.parameters is not None else "",
                                       strict=self.strict is not False)

    def echo(self) -> dict[str, Any]:
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters, "strict": self.strict is not False}


class ToolChoiceFunction(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    name: str


def _tool_choice(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") != "function":
        raise ValueError(f"tool_choice of type {value.get('type')!r} is not supported (only 'none', 'auto', "
                         "'required' or {'type': 'function', 'name': ...})")
    return value


TOOL_MODES = {"none": router_pb2.ToolChoice.MODE_NONE, "auto": router_pb2.ToolChoice.MODE_AUTO,
              "required": router_pb2.ToolChoice.MODE_REQUIRED}


class FormatText(BaseModel):
    model_config = STRICT

    type: Literal["text"]


class FormatJsonObject(BaseModel):
    model_config = STRICT

    type: Literal["json_object"]


class FormatJsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    type: Literal["json_schema"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None  # accepted, not shown to the model: the schema itself constrains the decoding
    strict: bool | None = None  # the text is always decoded under the schema (strict or not)


TextFormat = Annotated[FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")]


class TextParam(BaseModel):
    model_config = STRICT

    format: TextFormat | None = None
    verbosity: None = None  # no model here has a verbosity setting

    def constraint(self) -> common_pb2.Constraint | None:
        fmt = self.format
        if isinstance(fmt, FormatJsonObject):
            return common_pb2.Constraint(json_object=True)
        if isinstance(fmt, FormatJsonSchema):
            return common_pb2.Constraint(json_schema=json.dumps(fmt.schema_))
        return None

    def echo(self) -> dict[str, Any]:
        fmt = self.format.model_dump(by_alias=True, exclude_none=True) if self.format is not None else {"type": "text"}
        return {"format": fmt}


MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``."""

    model_config = STRICT

    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=16, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextParam | None = None
    tools: list[Annotated[FunctionToolParam, BeforeValidator(_function_tool)]] | None = None
    tool_choice: Annotated[Literal["none", "auto", "required"] | ToolChoiceFunction,
                           BeforeValidator(_tool_choice)] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = False
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)
    user: str | None = None  # sticky canary version (as on the chat route)

    def input_messages(self) -> list[common_pb2.ChatMessage]:
        """The input items as chat messages: a function call joins the assistant turn before it."""
        if isinstance(self.input, str):
            return [common_pb2.ChatMessage(role="user", content=self.input)]
        out: list[common_pb2.ChatMessage] = []
        for item in self.input:
            if isinstance(item, MessageItem):
                out.append(common_pb2.ChatMessage(role=ROLE_ALIASES.get(item.role, item.role),
                                                  content=_joined(item.content)))
            elif isinstance(item, FunctionCallItem):
                if not out or out[-1].role != "assistant":
                    out.append(common_pb2.ChatMessage(role="assistant"))
                out[-1].tool_calls.add(id=item.call_id, name=item.name, arguments=item.arguments)
            else:
                out.append(common_pb2.ChatMessage(role="tool", content=_joined(item.output),
                                                  tool_call_id=item.call_id))
        return out

    def check(self) -> None:
        """What the field types cannot say: refused with the ``param`` it concerns."""
        if isinstance(self.tool_choice, ToolChoiceFunction):
            if self.tool_choice.name not in {t.name for t in self.tools or ()}:
                raise _invalid("tool_choice", f"Invalid 'tool_choice': no function named "
                                              f"{self.tool_choice.name!r} in 'tools'.")
        if self.tool_choice in ("required",) and not self.tools:
            raise _invalid("tool_choice", "Invalid 'tool_choice': 'required' needs at least one tool in 'tools'.")

    def to_generate_request(self, history: Iterable[common_pb2.ChatMessage] = ()) -> router_pb2.GenerateRequest:
        """``history``: the conversation of ``previous_response_id`` (its instructions are not carried over)."""
        req = router_pb2.GenerateRequest(model=self.model, include_usage=True, user=self.user or "")
        if self.instructions is not None:
            req.chat.messages.add(role="system", content=self.instructions)
        req.chat.messages.extend(history)
        req.chat.messages.extend(self.input_messages())
        if self.max_output_tokens is not None:
            req.max_tokens = self.max_output_tokens
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if value is not None:
                setattr(req.sampling, name, value)
        constraint = self.text.constraint() if self.text is not None else None
        if constraint is not None:
            req.constraint.CopyFrom(constraint)
        req.tools.extend(t.to_pb() for t in self.tools or ())
        if isinstance(self.tool_choice, ToolChoiceFunction):
            req.tool_choice.mode = router_pb2.ToolChoice.MODE_FUNCTION
            req.tool_choice.function_name = self.tool_choice.name
        elif self.tool_choice is not None:
            req.tool_choice.mode = TOOL_MODES[self.tool_choice]
        if self.parallel_tool_calls is not None:
            req.parallel_tool_calls = self.parallel_tool_calls
        return req

    def echo(self) -> dict[str, Any]:
        """The request's fields as the response object repeats them (the schema requires most)."""
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, ToolChoiceFunction) else (
            self.tool_choice or "auto")
        out = {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "metadata": self.metadata or {}, "parallel_tool_calls": self.parallel_tool_calls is not False,
                "previous_response_id": self.previous_response_id, "store": self.store is not False,
                "temperature": DEFAULT_SAMPLING if self.temperature is None else self.temperature,
                "top_p": DEFAULT_SAMPLING if self.top_p is None else self.top_p,
                "text": (self.text or TextParam()).echo(), "tools": [t.echo() for t in self.tools or ()],
                "tool_choice": choice, "truncation": "disabled"}
        if self.user is not None:
            out["user"] = self.user  # a string in the schema: left out when not given
        return out


def parse_request(raw: bytes) -> ResponsesRequest:
    """The request, or a 400 naming the field: refused features before anything else."""
    try:
        # pydantic's parser, as the chat route's: a lone surrogate (which no protobuf string holds) and NaN are
        # invalid JSON here, not a 500 later
        data = pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise _invalid(None, "The request body must be a JSON object.")
    for name, value in data.items():
        if name in UNSUPPORTED_FIELDS and value is not None:
            raise _invalid(name, f"Unsupported parameter: '{name}' is not supported by this server.")
    data = {k: v for k, v in data.items() if k not in UNSUPPORTED_FIELDS}
    try:
        body = ResponsesRequest.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from None
    body.check()
    return body
