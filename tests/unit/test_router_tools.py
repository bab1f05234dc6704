"""Function calling in the router: prompt rendering, forced-choice schemas, and the streaming output parser."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inferplane.common.errors import InvalidArgument
from inferplane.router.tools import (
    CALL_CLOSE,
    CALL_OPEN,
    GUIDANCE,
    ToolCallParser,
    constraint_for,
    finish_reason,
    parser_for,
    render_messages,
    resolve_mode,
    validate_tools,
)
from inferplane.tokenization.bundle import TokenizerBundle
from inferplane.tokenization.local import message_dicts
from inferplane.v1 import common_pb2, router_pb2

TINY_LLAMA = Path(__file__).resolve().parents[2] / "services/inferplane/assets/models/tiny-llama"
Choice = router_pb2.ToolChoice
Msg = common_pb2.ChatMessage

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                   "where": {"type": "object", "properties": {"lat": {"type": "number"}}}},
    "required": ["city"],
}


def tool(name: str, parameters: Any = None, *, strict: bool = False, description: str = "") -> common_pb2.FunctionTool:
    params = parameters if isinstance(parameters, str) else ("" if parameters is None else json.dumps(parameters))
    return common_pb2.FunctionTool(name=name, description=description, parameters=params, strict=strict)


TOOLS = [tool("get_weather", WEATHER, description="Weather in a city"), tool("ping")]
AUTO, NONE, REQUIRED = Choice(mode=Choice.MODE_AUTO), Choice(mode=Choice.MODE_NONE), Choice(mode=Choice.MODE_REQUIRED)


def named(name: str) -> router_pb2.ToolChoice:
    return Choice(mode=Choice.MODE_FUNCTION, function_name=name)


def counter_ids() -> Any:
    numbers = itertools.count()
    return lambda: f"call_{next(numbers)}"


# --- validation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tools", "param"), [
    ([tool("has space")], "tools[0].function.name"),
    ([tool("")], "tools[0].function.name"),
    ([tool("ok"), tool("x" * 65)], "tools[1].function.name"),
    ([tool("a"), tool("a")], "tools[1].function.name"),
    ([tool("a", "{not json")], "tools[0].function.parameters"),
    ([tool("a", "[1]")], "tools[0].function.parameters"),
    ([tool("a", {"type": "string"})], "tools[0].function.parameters"),
    ([tool("a", {"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}})],
     "tools[0].function.parameters"),
    ([tool(f"t{i}") for i in range(129)], "tools"),
])
def test_bad_tools_are_refused_naming_the_field(tools: list[common_pb2.FunctionTool], param: str) -> None:
    for call in (lambda: validate_tools(tools), lambda: constraint_for(tools, REQUIRED, True),
                 lambda: render_messages([Msg(role="user", content="hi")], tools, AUTO)):
        with pytest.raises(InvalidArgument) as err:
            call()
        assert err.value.param == param


@pytest.mark.parametrize(("tools", "choice"), [
    ([], REQUIRED), ([], named("ping")), ([], AUTO), ([], NONE), (TOOLS, named("nope")), (TOOLS, named("")),
])
def test_bad_tool_choice_is_refused(tools: list[common_pb2.FunctionTool], choice: router_pb2.ToolChoice) -> None:
    for call in (lambda: resolve_mode(tools, choice), lambda: constraint_for(tools, choice, True),
                 lambda: parser_for(tools, choice, True)):
        with pytest.raises(InvalidArgument) as err:
            call()
        assert err.value.param == "tool_choice"


def test_unset_choice_is_auto_with_tools_and_none_without() -> None:
    assert resolve_mode(TOOLS, Choice()) == "auto"
    assert resolve_mode([], Choice()) == "none"
    assert resolve_mode(TOOLS, named("ping")) == "named"
    assert parser_for(TOOLS, NONE, True) is None
    assert parser_for([], Choice(), True) is None


# --- prompt ---------------------------------------------------------------------------------------------------


def test_no_tools_and_no_tool_messages_leave_the_messages_alone() -> None:
    messages = [Msg(role="system", content="be brief"), Msg(role="user", content="hi")]
    out = render_messages(messages, [], Choice())
    assert len(out) == 2 and all(a is b for a, b in zip(out, messages, strict=True))
    # tool_choice none: the functions are not offered, so nothing is added either
    out = render_messages(messages, TOOLS, NONE)
    assert all(a is b for a, b in zip(out, messages, strict=True))


def test_tools_go_in_a_system_message_first() -> None:
    user = Msg(role="user", content="weather in Paris?")
    out = render_messages([user], TOOLS, AUTO)
    assert [m.role for m in out] == ["system", "user"] and out[1] is user
    listed = [json.loads(line) for line in out[0].content.splitlines() if line.startswith("{")]
    assert listed == [
        {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
        {"name": "ping", "description": "", "parameters": {"type": "object"}},
    ]
    assert CALL_OPEN in out[0].content and CALL_CLOSE in out[0].content


def test_tools_are_appended_to_an_existing_system_message_without_changing_it() -> None:
    system = Msg(role="system", content="You are terse.")
    out = render_messages([system, Msg(role="user", content="hi")], TOOLS, REQUIRED, parallel=False)
    assert len(out) == 2 and out[0].content.startswith("You are terse.\n\n# Tools")
    assert "exactly one function" in out[0].content
    assert system.content == "You are terse."  # the caller's message is not modified
    assert "'ping'" in render_messages([system], TOOLS, named("ping"))[0].content


def test_earlier_calls_and_results_become_text() -> None:
    call = common_pb2.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    assistant = Msg(role="assistant", content="Let me look.", tool_calls=[call])
    result = Msg(role="tool", content="18C and sunny", tool_call_id="call_1")
    out = render_messages([Msg(role="user", content="weather?"), assistant, result], TOOLS, AUTO)
    assert out[2].role == "assistant" and not out[2].tool_calls
    text, block = out[2].content.split("\n")
    assert text == "Let me look."
    assert block.startswith(CALL_OPEN) and block.endswith(CALL_CLOSE)
    assert json.loads(block[len(CALL_OPEN):-len(CALL_CLOSE)]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert out[3].role == "tool" and not out[3].HasField("tool_call_id")
    assert out[3].content == '<tool_response id="call_1" name="get_weather">\n18C and sunny\n</tool_response>'
    # the history renders even when this turn offers no tools
    assert render_messages([assistant, result], [], Choice())[1].content == out[3].content


def test_rendered_messages_go_through_the_shipped_chat_template() -> None:
    bundle = TokenizerBundle.from_dir(TINY_LLAMA)
    call = common_pb2.ToolCall(id="call_9", name="ping", arguments="{}")
    messages = [Msg(role="user", content="ping it"), Msg(role="assistant", tool_calls=[call]),
                Msg(role="tool", content="pong", tool_call_id="call_9")]
    text = bundle.render_chat(message_dicts(render_messages(messages, TOOLS, AUTO)))
    assert text.startswith("<s><|system|># Tools")
    assert '<|assistant|><tool_call>{"name": "ping", "arguments": {}}</tool_call><|end|>' in text
    assert '<|tool|><tool_response id="call_9" name="ping">\npong\n</tool_response><|end|>' in text
    assert text.endswith("<|assistant|>")


@pytest.mark.parametrize(("messages", "param"), [
    ([Msg(role="tool", content="x")], "messages[0].tool_call_id"),
    ([Msg(role="tool", content="x", tool_call_id="call_unknown")], "messages[0].tool_call_id"),
    ([Msg(role="user", content="x"), Msg(role="user", tool_calls=[common_pb2.ToolCall(id="c", name="ping")])],
     "messages[1].tool_calls"),
])
def test_bad_tool_history_is_refused(messages: list[common_pb2.ChatMessage], param: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        render_messages(messages, TOOLS, AUTO)
    assert err.value.param == param


# --- constraint -----------------------------------------------------------------------------------------------


def schema_of(tools: list[common_pb2.FunctionTool], choice: router_pb2.ToolChoice, parallel: bool = True) -> Any:
    text = constraint_for(tools, choice, parallel)
    assert text is not None
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_none_and_auto_are_not_constrained() -> None:
    assert constraint_for(TOOLS, NONE, True) is None
    assert constraint_for(TOOLS, AUTO, True) is None
    assert constraint_for([], Choice(), True) is None


def test_named_function_is_decoded_under_its_parameters() -> None:
    v = schema_of(TOOLS, named("get_weather"))
    assert v.is_valid({"city": "Paris", "unit": "c", "extra": 1})  # not strict: more properties are allowed
    assert not v.is_valid({"unit": "c"})
    assert not v.is_valid([{"city": "Paris"}])
    empty = schema_of(TOOLS, named("ping"))
    assert empty.schema == {"type": "object", "x-guidance": GUIDANCE}
    assert empty.is_valid({}) and not empty.is_valid("x")


def test_strict_tool_allows_no_other_properties_at_any_depth() -> None:
    v = schema_of([tool("get_weather", WEATHER, strict=True)], named("get_weather"))
    assert v.is_valid({"city": "Paris", "where": {"lat": 1.5}})
    assert not v.is_valid({"city": "Paris", "extra": 1})
    assert not v.is_valid({"city": "Paris", "where": {"lat": 1.5, "lon": 2}})
    assert schema_of([tool("ping", strict=True)], named("ping")).schema == {
        "type": "object", "additionalProperties": False, "x-guidance": GUIDANCE}


def test_required_is_an_array_of_known_calls() -> None:
    v = schema_of(TOOLS, REQUIRED, parallel=True)
    one = {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert v.is_valid([one])
    assert v.is_valid([one, {"name": "ping", "arguments": {}}])
    assert not v.is_valid([])                                              # at least one call
    assert not v.is_valid([{"name": "nope", "arguments": {}}])             # only the given functions
    assert not v.is_valid([{"name": "get_weather", "arguments": {}}])      # under that function's schema
    assert not v.is_valid([{"name": "ping"}])                              # arguments are required
    assert not v.is_valid([{**one, "id": "x"}])                            # nothing else in a call
    single = schema_of(TOOLS, REQUIRED, parallel=False)
    assert single.is_valid([one]) and not single.is_valid([one, one])


def test_required_keeps_local_refs_working() -> None:
    params = {"type": "object", "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"}},
                                                  "required": ["x"]}},
              "properties": {"a": {"$ref": "#/$defs/pt"}, "next": {"$ref": "#"}}}
    tools = [tool("geo", params), tool("ping")]
    v = schema_of(tools, REQUIRED)
    assert v.is_valid([{"name": "geo", "arguments": {"a": {"x": 1}, "next": {"a": {"x": 2}}}}])
    assert not v.is_valid([{"name": "geo", "arguments": {"a": {"y": 1}}}])
    assert not v.is_valid([{"name": "geo", "arguments": {"next": {"a": {"x": "no"}}}}])
    assert schema_of(tools, named("geo")).is_valid({"a": {"x": 1}})


@pytest.fixture(scope="module")
def lltokenizer() -> llguidance.LLTokenizer:
    eos = TokenizerBundle.from_dir(TINY_LLAMA).stop_token_ids
    return llguidance.LLTokenizer((TINY_LLAMA / "tokenizer.json").read_text(encoding="utf-8"), eos_token=eos)


def decodes(tokenizer: llguidance.LLTokenizer, schema: str, text: str) -> bool:
    """Whether llguidance (the executor's constrained decoder) lets the model write exactly ``text``."""
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    ids = tokenizer.tokenize_str(text)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def test_llguidance_compiles_the_constraints_and_decodes_what_the_parser_reads(
        lltokenizer: llguidance.LLTokenizer) -> None:
    geo = {"type": "object", "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"}},
                                              "required": ["x"]}},
           "properties": {"a": {"$ref": "#/$defs/pt"}}, "required": ["a"]}
    tools = [*TOOLS, tool("geo", geo), tool("closed", {"type": "object"}, strict=True)]
    required = constraint_for(tools, REQUIRED, False)
    assert required is not None
    ok = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    assert decodes(lltokenizer, required, ok)
    assert decodes(lltokenizer, required, '[{"name": "geo", "arguments": {"a": {"x": 1.5}}}]')
    assert not decodes(lltokenizer, required, "[]")
    assert not decodes(lltokenizer, required, f"[{ok[1:-1]}, {ok[1:-1]}]")  # parallel_tool_calls false
    assert not decodes(lltokenizer, required, '[{"name": "geo", "arguments": {"a": {"y": 1}}}]')
    assert not decodes(lltokenizer, required, '[{"name": "closed", "arguments": {"x": 1}}]')
    assert not decodes(lltokenizer, required, '[{"name": "nope", "arguments": {}}]')
    weather = constraint_for(tools, named("get_weather"), True)
    assert weather is not None
    assert decodes(lltokenizer, weather, '{"city": "Oslo"}') and not decodes(lltokenizer, weather, '{"unit": "c"}')
    # no free whitespace: a small model cannot spend its tokens on blanks (it did, before "x-guidance")
    assert not decodes(lltokenizer, weather, '{"city":  "Oslo"}')
    assert not decodes(lltokenizer, required, "[ " + ok[1:])
    _, _, calls = run(ToolCallParser("required", tools), [ok])
    assert call_dicts(calls) == [("get_weather", {"city": "Paris"})]


# --- parser ---------------------------------------------------------------------------------------------------


def run(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list[router_pb2.ToolCallDelta],
                                                         list[common_pb2.ToolCall]]:
    content, deltas = [], []
    for piece in pieces:
        text, more = parser.feed(piece)
        content.append(text)
        deltas.extend(more)
    text, more, calls = parser.finish()
    return "".join(content) + text, deltas + more, calls


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in itertools.pairwise([0, *points, len(text)])]


def check_deltas(deltas: list[router_pb2.ToolCallDelta], calls: list[common_pb2.ToolCall]) -> None:
    """The stream's rules: a call's first delta has its index, id and name; the rest only add arguments, whose
    text is the same JSON as the call's compact arguments."""
    seen: dict[int, str] = {}
    for d in deltas:
        if d.index not in seen:
            assert d.index == len(seen) and d.id and d.name
            seen[d.index] = ""
        else:
            assert not d.id and not d.name
        seen[d.index] += d.arguments
    assert len(seen) == len(calls)
    for i, call in enumerate(calls):
        assert json.loads(seen[i]) == json.loads(call.arguments)
        assert call.arguments == json.dumps(json.loads(call.arguments), separators=(",", ":"), ensure_ascii=False)


def call_dicts(calls: list[common_pb2.ToolCall]) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_named_streams_the_arguments_as_they_come() -> None:
    p = ToolCallParser("named", TOOLS, name="get_weather", new_id=counter_ids())
    content, first = p.feed('{"ci')
    assert content == "" and [(d.index, d.id, d.name, d.arguments) for d in first] == [
        (0, "call_0", "get_weather", '{"ci')]
    assert p.feed('ty": "Paris"}')[1][0].arguments == 'ty": "Paris"}'
    content, last, calls = p.finish()
    assert (content, last) == ("", [])
    assert [(c.id, c.name, c.arguments) for c in calls] == [("call_0", "get_weather", '{"city":"Paris"}')]


def test_named_with_no_text_still_makes_the_call() -> None:
    content, deltas, calls = ToolCallParser("named", TOOLS, name="ping").finish()
    assert content == ""
    assert [(d.name, d.arguments) for d in deltas] == [("ping", "")] and calls[0].id.startswith("call_")
    assert len(calls[0].id) == len("call_") + 24


ARGS = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
CALLS = st.lists(st.tuples(st.sampled_from(["get_weather", "ping"]),
                           st.dictionaries(st.text(max_size=6), ARGS, max_size=3)), min_size=1, max_size=3)
CUTS = st.lists(st.integers(0, 400), max_size=12)


@settings(max_examples=150, deadline=None)
@given(calls=CALLS, indent=st.sampled_from([None, 1, 2]), cuts=CUTS)
def test_required_gives_the_same_calls_however_the_text_is_split(calls: list[tuple[str, Any]], indent: int | None,
                                                                 cuts: list[int]) -> None:
    text = json.dumps([{"name": n, "arguments": a} for n, a in calls], indent=indent, ensure_ascii=False)
    whole = run(ToolCallParser("required", TOOLS, new_id=counter_ids()), [text])
    parts = run(ToolCallParser("required", TOOLS, new_id=counter_ids()), split(text, cuts))
    assert call_dicts(parts[2]) == call_dicts(whole[2]) == calls
    assert parts[0] == whole[0] == ""
    check_deltas(parts[1], parts[2])
    assert list(whole[2]) == list(parts[2])  # same ids (the same id factory), names and arguments


def test_required_opens_a_call_as_soon_as_its_name_is_complete() -> None:
    p = ToolCallParser("required", TOOLS, new_id=counter_ids())
    assert p.feed('[{"name": "get_wea') == ("", [])
    _, deltas = p.feed('ther", "arguments": {"ci')
    assert [(d.index, d.id, d.name, d.arguments) for d in deltas] == [(0, "call_0", "get_weather", '{"ci')]
    _, deltas = p.feed('ty": "Oslo"}}, {"arguments": {}, "name": "ping"}]')  # arguments before the name
    assert [(d.index, d.id, d.name, d.arguments) for d in deltas] == [
        (0, "", "", 'ty": "Oslo"}'), (1, "call_1", "ping", "{}")]


def test_required_without_parallel_keeps_the_first_call_only() -> None:
    text = '[{"name": "ping", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "x"}}]'
    _, deltas, calls = run(ToolCallParser("required", TOOLS, parallel=False), [text])
    assert call_dicts(calls) == [("ping", {})] and {d.index for d in deltas} == {0}


def test_required_cut_short_returns_the_arguments_as_far_as_they_came() -> None:
    _, _, calls = run(ToolCallParser("required", TOOLS), ['[{"name": "get_weather", "arguments": {"city": "Pa'])
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Pa')]
    _, deltas, calls = run(ToolCallParser("required", TOOLS), ['[{"name": "get_'])
    assert (deltas, calls) == ([], [])


def block(name: str, args: Any) -> str:
    return CALL_OPEN + json.dumps({"name": name, "arguments": args}) + CALL_CLOSE


def test_auto_separates_content_from_calls() -> None:
    text = "Checking.\n" + block("get_weather", {"city": "Paris"}) + "\n" + block("ping", {}) + "\n"
    content, deltas, calls = run(ToolCallParser("auto", TOOLS, new_id=counter_ids()), [text])
    assert content == "Checking."
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("call_0", "get_weather", '{"city":"Paris"}'), ("call_1", "ping", "{}")]
    check_deltas(deltas, calls)


def test_auto_drops_whitespace_at_the_ends_of_the_content_once_a_call_is_made() -> None:
    content, _, calls = run(ToolCallParser("auto", TOOLS), ["\n", block("ping", {}), "\n ", " \n"])
    assert content == "" and call_dicts(calls) == [("ping", {})]
    pieces = [" \n", block("ping", {}), "\n", " ", "\nSure. ", "\n", block("ping", {}), "\n", " ", "\n Done. ", "\n"]
    content, _, calls = run(ToolCallParser("auto", TOOLS), pieces)
    assert content == "Sure. \n\n \n Done." and len(calls) == 2


def test_auto_holds_back_what_may_start_a_call() -> None:
    p = ToolCallParser("auto", TOOLS)
    assert p.feed("a <tool") == ("a", [])  # "<tool" might open a call; the space goes with it
    assert p.feed("s> b") == (" <tools> b", [])
    assert p.feed(" <tool_ca") == ("", [])
    assert p.finish() == (" <tool_ca", [], [])


@pytest.mark.parametrize("bad", [
    CALL_OPEN + "not json" + CALL_CLOSE,
    block("unknown_fn", {}),
    block("ping", "a string"),
    CALL_OPEN + json.dumps({"name": "ping", "arguments": {}, "id": 3}) + CALL_CLOSE,
    CALL_OPEN + '{"name": "ping", "arguments": {"x": ',  # never closed, cut short
])
def test_auto_leaves_a_block_that_is_not_a_call_as_content(bad: str) -> None:
    content, deltas, calls = run(ToolCallParser("auto", TOOLS), ["Hi ", bad, " bye"])
    assert (content, deltas, calls) == ("Hi " + bad + " bye", [], [])


def test_auto_accepts_an_unclosed_block_that_parses_at_the_end() -> None:
    _, _, calls = run(ToolCallParser("auto", TOOLS), [CALL_OPEN + '{"name": "ping"}'])
    assert [(c.name, c.arguments) for c in calls] == [("ping", "{}")]


def test_auto_without_parallel_keeps_the_first_call_only() -> None:
    text = block("ping", {}) + block("get_weather", {"city": "x"}) + "done"
    content, _, calls = run(ToolCallParser("auto", TOOLS, parallel=False), [text])
    assert content == "done" and call_dicts(calls) == [("ping", {})]


SEGMENTS = st.lists(
    st.one_of(st.text(alphabet="ab \n<>_/tolc{}\"", max_size=12).map(lambda t: ("text", t)),
              CALLS.map(lambda cs: ("call", cs[0]))),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(segments=SEGMENTS, cuts=CUTS)
def test_auto_gives_the_same_content_and_calls_however_the_text_is_split(segments: list[tuple[str, Any]],
                                                                         cuts: list[int]) -> None:
    text = "".join(block(*s) if kind == "call" else s for kind, s in segments)
    whole = run(ToolCallParser("auto", TOOLS, new_id=counter_ids()), [text])
    parts = run(ToolCallParser("auto", TOOLS, new_id=counter_ids()), split(text, cuts))
    assert parts[0] == whole[0]
    assert list(parts[2]) == list(whole[2])
    check_deltas(parts[1], parts[2])
    if not any(kind == "text" and "<" in s for kind, s in segments):  # no text that could open a call itself
        assert call_dicts(whole[2]) == [s for kind, s in segments if kind == "call"]
    if not whole[2]:  # no call: the content is the text, to the character
        assert whole[0] == text


def test_finish_reason_follows_openai() -> None:
    call = [common_pb2.ToolCall(id="call_1", name="ping", arguments="{}")]
    stop, length = common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH
    assert finish_reason("auto", call, stop) == common_pb2.FINISH_REASON_TOOL_CALLS
    assert finish_reason("auto", [], stop) == stop
    assert finish_reason("required", call, stop) == stop   # forced calls end with "stop", as OpenAI's do
    assert finish_reason("named", call, stop) == stop
    assert finish_reason("auto", call, length) == length
