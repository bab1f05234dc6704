"""OpenAI function calling for models whose chat template knows nothing of tools: prompt, constraint, parser.

Three pure pieces, no gRPC (``docs/tools.md`` says what the API does with them):

- ``render_messages`` writes the tools and the conversation's earlier calls and results as text the model's own
  chat template can render: a system message that lists the functions and the call format, assistant calls as
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes/Qwen format), tool results with the id
  of the call they answer.
- ``constraint_for`` is the JSON Schema a forced choice is decoded under (vLLM's approach): a named function's
  ``parameters`` (the output is its arguments), or for ``required`` an array of ``{"name", "arguments"}``.
- ``ToolCallParser`` turns the generated text, delta by delta, into content and ``ToolCallDelta``s, and at the end
  the complete ``ToolCall``s. ``finish_reason`` says what the choice's finish reason becomes.

Validation errors are ``InvalidArgument``s with OpenAI's ``param`` (``tools[0].function.name``, ``tool_choice``).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from inferplane.common.errors import InvalidArgument
from inferplane.v1 import common_pb2, router_pb2

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "Mode",
    "ToolCallParser",
    "constraint_for",
    "finish_reason",
    "parser_for",
    "render_messages",
    "resolve_mode",
    "validate_tools",
]

ChatMessage = common_pb2.ChatMessage
FunctionTool = common_pb2.FunctionTool
ToolCall = common_pb2.ToolCall
ToolChoice = router_pb2.ToolChoice
ToolCallDelta = router_pb2.ToolCallDelta

# What the router does with a request's tools: "named" is OpenAI's {"type": "function", "function": {"name"}}.
Mode = Literal["none", "auto", "required", "named"]
ParserMode = Literal["auto", "required", "named"]

CALL_OPEN: Final = "<tool_call>"
CALL_CLOSE: Final = "</tool_call>"
MAX_TOOLS: Final = 128  # OpenAI's limit on `tools`
_NAME = re.compile(r"[a-zA-Z0-9_-]+")
_NAME_MAX = 64
_ID_ALPHABET = string.ascii_letters + string.digits
_COMPACT = (",", ":")

# llguidance reads its JSON options from the schema's "x-guidance" (JSON Schema ignores unknown keywords): without
# this, its default allows any run of whitespace between tokens, and a small model fills max_tokens with spaces
# ("[" then 200 blanks, seen with the shipped tiny-llama). Fixed separators give json.dumps's own layout.
GUIDANCE: Final[Mapping[str, Any]] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_MODES: Final[Mapping[int, Mode]] = {
    ToolChoice.MODE_NONE: "none",
    ToolChoice.MODE_AUTO: "auto",
    ToolChoice.MODE_REQUIRED: "required",
    ToolChoice.MODE_FUNCTION: "named",
}


# --- validation ---------------------------------------------------------------------------------------------


def validate_tools(tools: Sequence[FunctionTool]) -> dict[str, dict[str, Any]]:
    """Each tool's name → its ``parameters`` as a JSON Schema object (``{"type": "object"}`` when empty).

    Raises ``InvalidArgument`` for too many tools, an invalid or duplicate name, and parameters that are not a
    JSON object schema (not JSON, not an object, a ``type`` other than "object", a ``$ref`` outside the schema).
    A strict tool's object schemas get ``additionalProperties: false`` where they do not say.
    """
    if len(tools) > MAX_TOOLS:
        raise InvalidArgument(f"Invalid 'tools': array too long. Expected an array with maximum length {MAX_TOOLS}, "
                              f"but got an array with length {len(tools)} instead.", param="tools")
    schemas: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        param = f"tools[{i}].function.name"
        if not _NAME.fullmatch(tool.name):
            raise InvalidArgument(f"Invalid '{param}': string does not match pattern. Expected a string that "
                                  "matches the pattern '^[a-zA-Z0-9_-]+$'.", param=param)
        if len(tool.name) > _NAME_MAX:
            raise InvalidArgument(f"Invalid '{param}': string too long. Expected a string with maximum length "
                                  f"{_NAME_MAX}, but got a string with length {len(tool.name)} instead.", param=param)
        if tool.name in schemas:
            raise InvalidArgument(f"Invalid 'tools': the function name '{tool.name}' is used twice; function names "
                                  "must be unique.", param=param)
        schemas[tool.name] = _parameters(tool, f"tools[{i}].function.parameters")
    return schemas


def _parameters(tool: FunctionTool, param: str) -> dict[str, Any]:
    if not tool.parameters.strip():
        return {"type": "object", "additionalProperties": False} if tool.strict else {"type": "object"}
    try:
        schema = json.loads(tool.parameters)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"Invalid '{param}': not valid JSON ({exc.msg} at position {exc.pos}).",
                              param=param) from exc
    if not isinstance(schema, dict):
        raise InvalidArgument(f"Invalid '{param}': expected a JSON Schema object, got {type(schema).__name__}.",
                              param=param)
    kind = schema.setdefault("type", "object")  # the arguments are always an object
    if kind != "object":
        raise InvalidArgument(f"Invalid schema for function '{tool.name}': schema must be a JSON Schema of "
                              f"'type: \"object\"', got 'type: {json.dumps(kind)}'.", param=param)
    for ref in _refs(schema):
        if not ref.startswith("#"):
            raise InvalidArgument(f"Invalid schema for function '{tool.name}': '$ref' {ref!r} points outside the "
                                  "schema; only local references ('#/...') are supported.", param=param)
    if tool.strict:
        _close_objects(schema)
    return schema


# Keywords whose value is a subschema, a list of them, or a map of them (JSON Schema 2020-12 and draft 7).
_SUB_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
            "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_SUB_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUB_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _subschemas(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for key in _SUB_ONE:
        if isinstance(schema.get(key), dict):
            yield schema[key]
        elif key == "items" and isinstance(schema.get(key), list):  # draft 7's tuple form
            yield from (s for s in schema[key] if isinstance(s, dict))
    for key in _SUB_LIST:
        if isinstance(schema.get(key), list):
            yield from (s for s in schema[key] if isinstance(s, dict))
    for key in _SUB_MAP:
        if isinstance(schema.get(key), dict):
            yield from (s for s in schema[key].values() if isinstance(s, dict))


def _refs(schema: dict[str, Any]) -> Iterator[str]:
    if isinstance(schema.get("$ref"), str):
        yield schema["$ref"]
    for sub in _subschemas(schema):
        yield from _refs(sub)


def _close_objects(schema: dict[str, Any]) -> None:
    """Strict: every object schema that does not say otherwise allows no properties beyond its own."""
    kind = schema.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in schema
    if is_object and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    for sub in _subschemas(schema):
        _close_objects(sub)


def _relocate_refs(schema: Any, base: str) -> Any:
    """A copy of ``schema`` whose local refs (``#``, ``#/...``) point into it once it sits at pointer ``base``."""
    if isinstance(schema, list):
        return [_relocate_refs(s, base) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _relocate_refs(v, base) for k, v in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = "#" + base + ref[1:]
    return out


def resolve_mode(tools: Sequence[FunctionTool], choice: ToolChoice) -> Mode:
    """What ``tool_choice`` asks for, given ``tools``; unset means "auto" with tools, else "none".

    Raises ``InvalidArgument`` (param ``tool_choice``) as OpenAI does when tool_choice is set without tools, and
    for a named function that is not among them.
    """
    if choice.mode == ToolChoice.MODE_UNSPECIFIED:
        return "auto" if tools else "none"
    mode = _MODES.get(choice.mode)
    if mode is None:
        raise InvalidArgument(f"Invalid value for 'tool_choice': unknown mode {choice.mode}.", param="tool_choice")
    if not tools:
        raise InvalidArgument("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
                              "specified.", param="tool_choice")
    if mode == "named" and choice.function_name not in {t.name for t in tools}:
        raise InvalidArgument(f"Invalid value for 'tool_choice': function '{choice.function_name}' is not one of "
                              "the functions in 'tools'.", param="tool_choice")
    return mode


# --- prompt ---------------------------------------------------------------------------------------------------


def render_messages(messages: Sequence[ChatMessage], tools: Sequence[FunctionTool],
                    choice: ToolChoice, *, parallel: bool = True) -> list[ChatMessage]:
    """The conversation with tools and earlier calls written as text the model's chat template renders.

    With a mode other than "none", a system message listing the functions and how to call them is put first (or
    appended to the first message when that is a system message). An assistant message's ``tool_calls`` become
    ``<tool_call>`` blocks after its content; a tool message keeps its role and gets a ``<tool_response>`` wrapper
    naming the call it answers. Messages that need no change are the same objects; with nothing to add or rewrite
    the list holds exactly ``messages``.

    Raises ``InvalidArgument`` for bad tools or tool_choice (``validate_tools``, ``resolve_mode``), a tool message
    without ``tool_call_id`` or answering no earlier call, and ``tool_calls`` on a message not from the assistant.
    """
    schemas = validate_tools(tools)
    mode = resolve_mode(tools, choice)
    out: list[ChatMessage] = []
    names: dict[str, str] = {}  # call id -> function name, from the assistant messages so far
    for i, message in enumerate(messages):
        if message.tool_calls:
            out.append(_assistant_with_calls(message, i, names))
        elif message.role == "tool":
            out.append(_tool_result(message, i, names))
        else:
            out.append(message)
    if mode == "none":
        return out
    preamble = _tools_preamble(tools, schemas, mode, choice.function_name, parallel)
    if out and out[0].role == "system":
        first = ChatMessage()
        first.CopyFrom(out[0])
        first.content = f"{first.content}\n\n{preamble}" if first.content else preamble
        return [first, *out[1:]]
    return [ChatMessage(role="system", content=preamble), *out]


def _assistant_with_calls(message: ChatMessage, i: int, names: dict[str, str]) -> ChatMessage:
    if message.role != "assistant":
        raise InvalidArgument(f"Invalid 'messages[{i}]': only assistant messages may have 'tool_calls'.",
                              param=f"messages[{i}].tool_calls")
    blocks = []
    for call in message.tool_calls:
        names[call.id] = call.name
        blocks.append(_call_text(call.name, call.arguments))
    rewritten = ChatMessage(role=message.role, content="\n".join(filter(None, [message.content, *blocks])))
    if message.HasField("name"):
        rewritten.name = message.name
    return rewritten


def _call_text(name: str, arguments: str) -> str:
    try:
        args: Any = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        args = arguments  # history is the caller's: written back as it was sent, a JSON string
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"{CALL_OPEN}{body}{CALL_CLOSE}"


def _tool_result(message: ChatMessage, i: int, names: Mapping[str, str]) -> ChatMessage:
    param = f"messages[{i}].tool_call_id"
    if not message.tool_call_id:
        raise InvalidArgument(f"Missing required parameter: '{param}'.", param=param)
    if message.tool_call_id not in names:
        raise InvalidArgument(f"Invalid parameter: messages with role 'tool' must be a response to a preceding "
                              f"message with 'tool_calls'; no earlier call has id '{message.tool_call_id}'.",
                              param=param)
    call_id = json.dumps(message.tool_call_id, ensure_ascii=False)
    name = json.dumps(names[message.tool_call_id], ensure_ascii=False)
    content = f"<tool_response id={call_id} name={name}>\n{message.content}\n</tool_response>"
    return ChatMessage(role="tool", content=content)


def _tools_preamble(tools: Sequence[FunctionTool], schemas: Mapping[str, dict[str, Any]], mode: Mode,
                    function_name: str, parallel: bool) -> str:
    listed = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": schemas[t.name]},
                   ensure_ascii=False)
        for t in tools
    )
    lines = ["# Tools", "", "You can call these functions (one JSON object per line: name, description, "
             "parameters as a JSON Schema):", "<tools>", listed, "</tools>", ""]
    if mode == "named":
        lines.append(f"Call the function {function_name!r} now. Reply with its arguments only: one JSON object "
                     "that follows its parameters schema.")
    elif mode == "required":
        many = "one or more functions" if parallel else "exactly one function"
        lines.append(f"Call {many} now. Reply with a JSON array of calls only, each "
                     '{"name": <function name>, "arguments": <JSON object following its parameters>}.')
    else:
        how = "You may call several functions, one block each." if parallel else "Call at most one function."
        lines.append("To call a function, write its name and arguments as a JSON object between "
                     f'{CALL_OPEN} and {CALL_CLOSE}, for example {CALL_OPEN}{{"name": "function_name", '
                     f'"arguments": {{"argument": "value"}}}}{CALL_CLOSE}. {how} '
                     "The results come back in tool messages. When no function is needed, answer in plain text.")
    return "\n".join(lines)


# --- constraint -----------------------------------------------------------------------------------------------


def constraint_for(tools: Sequence[FunctionTool], choice: ToolChoice, parallel: bool) -> str | None:
    """The JSON Schema (as JSON text) a forced choice's output is decoded under; ``None`` for none and auto.

    named: the function's ``parameters`` (the output is the arguments object). required: an array of
    ``{"name": <const>, "arguments": <that function's parameters>}`` (``anyOf`` over the tools), at least one,
    at most one when ``parallel`` is false. The root carries llguidance's options (``GUIDANCE``: no free
    whitespace, ``", "`` and ``": "`` between items and after keys). A tool schema with local ``$ref``s is
    moved under the root's ``$defs`` and its refs rewritten, so that they still resolve inside the array.
    """
    schemas = validate_tools(tools)
    mode = resolve_mode(tools, choice)
    if mode == "named":
        schema = {**schemas[choice.function_name]}
        schema.setdefault("x-guidance", dict(GUIDANCE))  # a caller's own llguidance options win
        return json.dumps(schema, ensure_ascii=False)
    if mode != "required":
        return None
    defs: dict[str, Any] = {}
    options = []
    for name, params in schemas.items():
        if any(True for _ in _refs(params)):
            defs[name] = _relocate_refs(params, f"/$defs/{name}")  # names need no JSON-pointer escaping
            params = {"$ref": f"#/$defs/{name}"}
        options.append({
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    root: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}, "x-guidance": dict(GUIDANCE)}
    if not parallel:
        root["maxItems"] = 1
    if defs:
        root["$defs"] = defs
    return json.dumps(root, ensure_ascii=False)


# --- output ---------------------------------------------------------------------------------------------------


def finish_reason(mode: Mode, calls: Sequence[ToolCall], reason: int) -> int:
    """The choice's finish reason (a ``common_pb2.FinishReason``) once its calls are known.

    OpenAI says "tool_calls" only when the model chose to call under tool_choice auto; a forced call (required
    or a named function) ends with "stop", as OpenAI documents and vLLM does. Anything but a stop (length,
    cancelled, error) is kept: a call cut by max_tokens is "length".
    """
    if reason == common_pb2.FINISH_REASON_STOP and mode == "auto" and calls:
        return common_pb2.FINISH_REASON_TOOL_CALLS
    return reason


def new_call_id(prefix: str = "call_") -> str:
    """A fresh call id like OpenAI's: the prefix and 24 random letters and digits."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def _compact(arguments: str) -> str:
    """The arguments as compact JSON; text that does not parse (a call cut short) is returned as it is."""
    try:
        return json.dumps(json.loads(arguments), separators=_COMPACT, ensure_ascii=False)
    except json.JSONDecodeError:
        return arguments


@dataclass
class _Call:
    index: int
    id: str
    name: str
    arguments: str = ""


@dataclass
class _Element:
    """One element of the "required" array, as the scanner has seen it so far (positions in the text)."""

    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    call: _Call | None = None
    sent: int = 0  # how far (a text position) its arguments have been streamed


class ToolCallParser:
    """Generated text, delta by delta → content to show and tool-call deltas to stream; at the end, the calls.

    mode "named": the whole text is the arguments of ``name``, streamed as it comes. "required": the text is a
    JSON array of ``{"name", "arguments"}``; a call's first delta goes out once its name is complete, then its
    arguments stream as they come. "auto": free text with ``<tool_call>{...}</tool_call>`` blocks; a block is
    sent whole once it closes (only then is it known to be a call), and a block that is not valid JSON, names an
    unknown function or has arguments that are not an object stays content. Text that could be the start of
    ``<tool_call>`` is held back until the next delta decides. Once a call is made, whitespace at the start and the
    end of the content is dropped (the content of ``\n<tool_call>...</tool_call>\n`` is empty).
    Without ``parallel``, calls after the first are dropped.
    """

    def __init__(self, mode: ParserMode, tools: Sequence[FunctionTool], id_prefix: str = "call_", *,
                 name: str | None = None, parallel: bool = True,
                 new_id: Callable[[], str] | None = None) -> None:
        assert mode != "named" or name, "named mode needs the function's name"
        self.mode = mode
        self._names = frozenset(t.name for t in tools)
        self._name = name
        self._parallel = parallel
        self._new_id = new_id or (lambda: new_call_id(id_prefix))
        self._calls: list[_Call] = []
        self._text = ""            # named/required: everything fed; auto: what is not decided yet
        self._scanner = _JsonScanner(self._on_value_start, self._on_value_end) if mode == "required" else None
        self._elements: list[_Element] = []
        self._in_block = False     # auto: inside <tool_call> ... </tool_call>
        self._held_space = ""      # auto: trailing whitespace of the content, sent only if more content follows
        self._shown = False        # auto: some content has been returned
        self._saw_call = False     # auto: a call was made (whitespace at the content's start and end is dropped)
        self._finished = False

    @property
    def calls(self) -> list[ToolCall]:
        """The calls so far, arguments as compact JSON."""
        return [ToolCall(id=c.id, name=c.name, arguments=_compact(c.arguments)) for c in self._calls]

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Take the next text delta; return the content to show and the tool-call deltas to stream."""
        assert not self._finished, "feed after finish"
        return _FEEDERS[self.mode](self, text, False)

    def finish(self) -> tuple[str, list[ToolCallDelta], list[ToolCall]]:
        """Flush at the end of the generation: the last content and deltas, and every call made."""
        content, deltas = _FEEDERS[self.mode](self, "", True)
        self._finished = True
        return content, deltas, self.calls

    def _open(self, name: str, arguments: str = "") -> ToolCallDelta:
        call = _Call(index=len(self._calls), id=self._new_id(), name=name, arguments=arguments)
        self._calls.append(call)
        return ToolCallDelta(index=call.index, id=call.id, name=call.name, arguments=arguments)

    # named ------------------------------------------------------------------------------------------------------

    def _feed_named(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        assert self._name is not None
        if not self._calls:
            return "", [self._open(self._name, text)]
        if not text:
            return "", []
        self._calls[0].arguments += text
        return "", [ToolCallDelta(index=0, arguments=text)]

    # required ---------------------------------------------------------------------------------------------------

    def _feed_required(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        assert self._scanner is not None
        start = len(self._text)
        self._text += text
        self._scanner.feed(text, start)
        deltas: list[ToolCallDelta] = []
        for element in self._elements:
            if element.name is None or element.name not in self._names:
                continue
            if element.call is None and (self._parallel or not self._calls):
                open_delta = self._open(element.name)
                element.call = self._calls[-1]
                deltas.append(open_delta)
            if element.call is None or element.args_start is None:
                continue
            end = element.args_end if element.args_end is not None else len(self._text)
            chunk = self._text[max(element.sent, element.args_start):end]
            element.sent = end
            if chunk:
                element.call.arguments += chunk
                if deltas and deltas[-1].index == element.call.index:
                    deltas[-1].arguments += chunk
                else:
                    deltas.append(ToolCallDelta(index=element.call.index, arguments=chunk))
        return "", deltas

    def _on_value_start(self, depth: int, key: str | None, pos: int) -> None:
        if depth == 1:
            self._elements.append(_Element())
        elif depth == 2 and key == "arguments" and self._elements:
            self._elements[-1].args_start = pos

    def _on_value_end(self, depth: int, key: str | None, start: int, end: int) -> None:
        if depth != 2 or not self._elements:
            return
        element = self._elements[-1]
        if key == "arguments":
            element.args_end = end
        elif key == "name":
            try:
                name = json.loads(self._text[start:end])
            except json.JSONDecodeError:
                return
            element.name = name if isinstance(name, str) else None

    # auto -------------------------------------------------------------------------------------------------------

    def _feed_auto(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        self._text += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            if self._in_block:
                close = self._text.find(CALL_CLOSE)
                if close < 0 and not final:
                    break
                block = self._text if close < 0 else self._text[:close]
                self._text = "" if close < 0 else self._text[close + len(CALL_CLOSE):]
                self._in_block = False
                closing = "" if close < 0 else CALL_CLOSE
                self._end_block(block, closing, content, deltas)
                continue
            at = self._text.find(CALL_OPEN)
            if at >= 0:
                content.append(self._content(self._text[:at]))
                self._text = self._text[at + len(CALL_OPEN):]
                self._in_block = True
                continue
            keep = 0 if final else _partial_suffix(self._text, CALL_OPEN)
            content.append(self._content(self._text[:len(self._text) - keep]))
            self._text = self._text[len(self._text) - keep:]
            break
        if final and not self._saw_call:
            content.append(self._held_space)
            self._held_space = ""
        return "".join(content), deltas

    def _content(self, text: str) -> str:
        """Content text, less trailing whitespace (held until more content comes, or the end when no call came)."""
        text = self._held_space + text
        if self._saw_call and not self._shown:
            text = text.lstrip()
        kept = text.rstrip()
        self._held_space = text[len(kept):]
        self._shown = self._shown or bool(kept)
        return kept

    def _end_block(self, block: str, closing: str, content: list[str], deltas: list[ToolCallDelta]) -> None:
        parsed = self._parse_block(block)
        if parsed is None:  # not a call: the whole block is content
            content.append(self._held_space + CALL_OPEN + block + closing)
            self._held_space, self._shown = "", True
            return
        self._saw_call = True
        if self._parallel or not self._calls:
            deltas.append(self._open(*parsed))

    def _parse_block(self, block: str) -> tuple[str, str] | None:
        try:
            value = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict) or not set(value) <= {"name", "arguments"}:
            return None
        name, arguments = value.get("name"), value.get("arguments", {})
        if name not in self._names or not isinstance(arguments, dict):
            return None
        return name, json.dumps(arguments, separators=_COMPACT, ensure_ascii=False)


_FEEDERS: Final[Mapping[str, Callable[[ToolCallParser, str, bool], tuple[str, list[ToolCallDelta]]]]] = {
    "named": ToolCallParser._feed_named,
    "required": ToolCallParser._feed_required,
    "auto": ToolCallParser._feed_auto,
}


def parser_for(tools: Sequence[FunctionTool], choice: ToolChoice, parallel: bool,
               id_prefix: str = "call_") -> ToolCallParser | None:
    """The parser for a request's output; ``None`` when tool_choice resolves to "none" (the text is content)."""
    validate_tools(tools)
    mode = resolve_mode(tools, choice)
    if mode == "none":
        return None
    return ToolCallParser(mode, tools, id_prefix, name=choice.function_name or None, parallel=parallel)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


# --- an incremental JSON scanner ------------------------------------------------------------------------------

_SCALAR_CHARS: Final = frozenset("0123456789+-.eEtrufalsn")


@dataclass
class _Frame:
    kind: str                 # "{" or "["
    start: int                # position of the bracket
    key_in_parent: str | None
    key: str | None = None    # objects: the key whose value comes next
    expect_key: bool = True   # objects: a string here is a key


@dataclass
class _JsonScanner:
    """Follows JSON text character by character and reports where values start and end.

    ``on_start(depth, key, pos)`` and ``on_end(depth, key, start, end)`` get the depth of the container the value
    sits in (0 for the top value) and, inside an object, its key. It never raises: text that is not JSON just
    reports nothing sensible (the "required" output is decoded under a schema; a cut-off text simply ends).
    """

    on_start: Callable[[int, str | None, int], None]
    on_end: Callable[[int, str | None, int, int], None]
    _stack: list[_Frame] = field(default_factory=list)
    _in_string: bool = False
    _escape: bool = False
    _string_is_key: bool = False
    _in_scalar: bool = False
    _start: int = 0           # where the current string or scalar began
    _key_chars: list[str] = field(default_factory=list)

    def feed(self, text: str, offset: int) -> None:
        for i, ch in enumerate(text):
            self._step(ch, offset + i)

    def _key(self) -> str | None:
        return self._stack[-1].key if self._stack and self._stack[-1].kind == "{" else None

    def _step(self, ch: str, pos: int) -> None:
        if self._in_string:
            if self._string_is_key:
                self._key_chars.append(ch)
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if self._string_is_key:
                    self._end_key()
                else:
                    self.on_end(len(self._stack), self._key(), self._start, pos + 1)
            return
        if self._in_scalar:
            if ch in _SCALAR_CHARS:
                return
            self._in_scalar = False
            self.on_end(len(self._stack), self._key(), self._start, pos)
        if ch in " \t\r\n" or ch in ",:":
            if ch == "," and self._stack and self._stack[-1].kind == "{":
                self._stack[-1].expect_key = True
            return
        top = self._stack[-1] if self._stack else None
        if ch == '"':
            self._in_string, self._start = True, pos
            self._string_is_key = top is not None and top.kind == "{" and top.expect_key
            if self._string_is_key:
                self._key_chars = ['"']
            else:
                self.on_start(len(self._stack), self._key(), pos)
        elif ch in "{[":
            self.on_start(len(self._stack), self._key(), pos)
            self._stack.append(_Frame(ch, pos, self._key()))
        elif ch in "}]":
            if top is None:
                return
            self._stack.pop()
            self.on_end(len(self._stack), top.key_in_parent, top.start, pos + 1)
        else:
            self._in_scalar, self._start = True, pos
            self.on_start(len(self._stack), self._key(), pos)

    def _end_key(self) -> None:
        top = self._stack[-1]
        try:
            top.key = json.loads("".join(self._key_chars))
        except json.JSONDecodeError:
            top.key = None
        top.expect_key = False
