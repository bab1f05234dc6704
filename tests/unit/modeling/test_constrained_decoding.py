"""Constrained decoding with llguidance on the real tiny-llama: masks, matchers and what the model then writes."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from inferplane.assets import TINY_LLAMA
from inferplane.modeling.constrained import (
    ConstraintError,
    GrammarCompiler,
    Matcher,
    apply_masks,
    unpack_bits,
    unpack_bits_torch,
)
from inferplane.modeling.llama import LlamaForCausalLM, load_model

EOS_IDS = frozenset({1, 6})
STRICT_SCHEMA = {  # OpenAI strict mode: every property required, no additional properties
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "enabled": {"type": "boolean"},
        "label": {"type": "string", "maxLength": 8},
    },
    "required": ["count", "colour", "enabled", "label"],
    "additionalProperties": False,
}


def spec_of(**kind: object) -> str:
    return json.dumps(kind)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return load_model(TINY_LLAMA, dtype="float32", device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TINY_LLAMA / "tokenizer.json"))


@pytest.fixture(scope="module")
def compiler(model: LlamaForCausalLM) -> GrammarCompiler:
    return GrammarCompiler(TINY_LLAMA, model.config.vocab_size, EOS_IDS, threads=2)


def token_id(tokenizer: Tokenizer, piece: str) -> int:
    found = tokenizer.token_to_id(piece)
    assert found is not None, f"{piece!r} is not one token"
    return found


def allowed_ids(matcher: Matcher, vocab: int) -> set[int]:
    logits = torch.zeros(1, vocab)
    apply_masks(logits, [(0, matcher)])
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def sample_constrained(
    model: LlamaForCausalLM, prompt: list[int], matchers: list[Matcher], *, max_tokens: int, seed: int = 0,
) -> list[tuple[list[int], str]]:
    """Decode len(matchers) rows of one prompt in lockstep at temperature 1, each row with its own seeded generator.

    Returns per row (tokens, finish): "stop" on an eos id or a finished grammar, else "length". The scheduler's
    per-step contract: apply_masks before sampling, accept the chosen token, end on eos or is_finished().
    """
    rows = len(matchers)
    generators = [torch.Generator().manual_seed(seed + r) for r in range(rows)]
    out: list[list[int]] = [[] for _ in range(rows)]
    finish: list[str | None] = [None] * rows
    with torch.inference_mode():
        model.setup_caches(rows, len(prompt) + max_tokens)
        idx = torch.tensor(prompt).expand(rows, -1)  # [B, S]: prefill, every row the same prompt
        logits = model(idx, torch.arange(len(prompt)), last_only=True)[:, -1]  # [B, V]
        for step in range(max_tokens):
            live = [r for r in range(rows) if finish[r] is None]
            if not live:
                break
            apply_masks(logits, [(r, matchers[r]) for r in live])
            probs = logits.softmax(-1)  # [B, V]
            tokens = torch.zeros(rows, dtype=torch.long)  # finished rows keep decoding a filler, never read
            for r in live:
                token = int(torch.multinomial(probs[r], 1, generator=generators[r]))
                matchers[r].accept(token)
                tokens[r] = token
                if token in EOS_IDS:
                    finish[r] = "stop"
                    continue
                out[r].append(token)
                if matchers[r].is_finished():
                    finish[r] = "stop"
            pos = torch.tensor([len(prompt) + step])  # [1]: decode_one_token for every row at once
            logits = model(tokens[:, None], pos)[:, -1]  # [B, V]
    return [(out[r], finish[r] or "length") for r in range(rows)]


def test_strict_json_schema_all_100_samples_validate(
    model: LlamaForCausalLM, tokenizer: Tokenizer, compiler: GrammarCompiler,
) -> None:
    grammar = compiler.compile(spec_of(json_schema=json.dumps(STRICT_SCHEMA)))
    prompt = tokenizer.encode("Return the settings as a JSON object.").ids
    results = sample_constrained(model, prompt, [grammar.matcher() for _ in range(100)], max_tokens=120)
    texts = [tokenizer.decode(tokens) for tokens, _ in results]
    assert all(finish == "stop" for _, finish in results), texts
    for text in texts:
        jsonschema.validate(json.loads(text), STRICT_SCHEMA)
    assert len(set(texts)) > 10, texts  # sampling at temperature 1 really varies the values
    assert all(len(tokens) < 60 for tokens, _ in results)  # compact: no optional whitespace
    assert all(list(json.loads(t)) == ["count", "colour", "enabled", "label"] for t in texts)  # schema order


def test_json_object_output_that_stops_parses_to_a_dict(
    model: LlamaForCausalLM, tokenizer: Tokenizer, compiler: GrammarCompiler,
) -> None:
    # Nothing bounds an arbitrary object (its strings have no maxLength): this docstring-trained model often
    # writes prose into a key until max_tokens. What did stop must be a whole JSON object.
    grammar = compiler.compile(spec_of(json_object=True))
    prompt = tokenizer.encode("Return a dict.").ids
    results = sample_constrained(model, prompt, [grammar.matcher() for _ in range(16)], max_tokens=120)
    stopped = [tokenizer.decode(tokens) for tokens, finish in results if finish == "stop"]
    assert len(stopped) >= 2, results
    for text in stopped:
        assert isinstance(json.loads(text), dict), text
    for tokens, finish in results:
        if finish == "length":
            assert tokenizer.decode(tokens).startswith("{"), tokens


def test_regex_and_lark_constraints_match(
    model: LlamaForCausalLM, tokenizer: Tokenizer, compiler: GrammarCompiler,
) -> None:
    pattern = r"[A-Z][a-z]{1,6}-[0-9]{2,4}"
    prompt = tokenizer.encode("The identifier is").ids
    grammar = compiler.compile(spec_of(regex=pattern))
    results = sample_constrained(model, prompt, [grammar.matcher() for _ in range(20)], max_tokens=40)
    for tokens, finish in results:
        assert finish == "stop" and re.fullmatch(pattern, tokenizer.decode(tokens)), tokenizer.decode(tokens)

    lark = compiler.compile(spec_of(lark='start: "yes" | "no" | "maybe"'))
    results = sample_constrained(model, prompt, [lark.matcher() for _ in range(8)], max_tokens=10)
    assert {tokenizer.decode(tokens) for tokens, _ in results} <= {"yes", "no", "maybe"}


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (spec_of(json_schema='{"type": "objectx"}'), "Invalid type"),
        (spec_of(json_schema='{"type": "string", "format": "no-such-format"}'), "Unknown format"),
        (spec_of(json_schema="{not json"), "not valid JSON"),
        (spec_of(json_schema='["an array"]'), "must be a JSON object"),
        (spec_of(json_schema={"type": "object"}), "schema as JSON text"),
        (spec_of(regex="a(b"), "unclosed group"),
        (spec_of(lark="start: undefined_rule"), "unknown name"),
        (spec_of(json_object=False), "must be true"),
        (spec_of(xml="<a/>"), "unknown constraint kind"),
        ('{"regex": "a", "lark": "start: \\"a\\""}', "exactly one"),
        ("not json", "not valid JSON"),
    ],
)
def test_a_bad_spec_raises_constraint_error_saying_why(compiler: GrammarCompiler, spec: str, reason: str) -> None:
    with pytest.raises(ConstraintError, match=reason):
        compiler.compile(spec)


def test_accept_of_a_disallowed_token_raises(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    matcher = compiler.compile(spec_of(regex="[0-9]{2}")).matcher()
    assert token_id(tokenizer, "{") not in allowed_ids(matcher, compiler.vocab_size)
    assert matcher.error is None
    with pytest.raises(ConstraintError, match="not allowed"):
        matcher.accept(token_id(tokenizer, "{"))
    assert matcher.error and matcher.is_finished()  # dead: its masks allow only the end
    assert allowed_ids(matcher, compiler.vocab_size) == EOS_IDS
    eos_early = compiler.compile(spec_of(regex="[0-9]{2}")).matcher()
    with pytest.raises(ConstraintError):
        eos_early.accept(1)  # the grammar cannot end before two digits


def test_eos_ids_are_allowed_exactly_where_the_grammar_can_end(
    compiler: GrammarCompiler, tokenizer: Tokenizer,
) -> None:
    matcher = compiler.compile(spec_of(regex="[0-9]+")).matcher()
    assert not allowed_ids(matcher, compiler.vocab_size) & EOS_IDS
    matcher.accept(token_id(tokenizer, "7"))
    allowed = allowed_ids(matcher, compiler.vocab_size)
    assert allowed >= EOS_IDS and token_id(tokenizer, "8") in allowed
    assert not matcher.is_finished()  # more digits may follow
    matcher.accept(6)  # <|end|>, the second eos id, is accepted like </s>

    fixed = compiler.compile(spec_of(regex="[0-9]")).matcher()
    fixed.accept(token_id(tokenizer, "7"))
    assert fixed.is_finished() and allowed_ids(fixed, compiler.vocab_size) == EOS_IDS


def test_vocab_wider_than_the_tokenizer_never_allows_the_extra_ids() -> None:
    wide = GrammarCompiler(TINY_LLAMA, 4096 + 37, EOS_IDS, threads=1)
    matcher = wide.compile(spec_of(regex="(.|\n)*")).matcher()  # anything: the widest mask there is
    allowed = allowed_ids(matcher, 4096 + 37)
    assert len(allowed) > 3000
    assert max(allowed) < 4096
    assert not allowed & {0, 2, 3, 4, 5}  # <s>, <pad> and the chat markers are no text of a grammar
    with pytest.raises(ConstraintError):
        matcher.accept(4096 + 5)
    with pytest.raises(ValueError, match="vocab size too small"):
        GrammarCompiler(TINY_LLAMA, 4000, EOS_IDS)


def test_apply_masks_leaves_free_rows_alone_and_caches_grammars(compiler: GrammarCompiler) -> None:
    logits = torch.randn(3, compiler.vocab_size, generator=torch.Generator().manual_seed(0))  # [R, V]
    before = logits.clone()
    spec = spec_of(json_object=True)
    grammar = compiler.compile(spec)
    assert compiler.compile(spec) is grammar
    apply_masks(logits, [(2, grammar.matcher()), (0, compiler.compile(spec_of(regex="x")).matcher())])
    assert torch.equal(logits[1], before[1])
    assert torch.isfinite(logits[2]).sum() == 1 and torch.isfinite(logits[0]).sum() == 1  # "{" and "x"
    assert int(logits[2].argmax()) != int(logits[0].argmax())
    apply_masks(logits, [])  # no constrained row: nothing to do


def test_the_grammar_cache_is_bounded() -> None:
    small = GrammarCompiler(TINY_LLAMA, 4096, EOS_IDS, cache_size=2, threads=1)
    first = small.compile(spec_of(regex="a"))
    second = small.compile(spec_of(regex="b"))
    assert small.compile(spec_of(regex="a")) is first  # a hit refreshes "a"
    small.compile(spec_of(regex="c"))  # evicts "b", the least recently used
    assert small.compile(spec_of(regex="a")) is first
    assert small.compile(spec_of(regex="b")) is not second


def test_the_accelerator_unpacking_agrees_with_numpys() -> None:
    # apply_masks unpacks with numpy for CPU logits and with torch ops on an accelerator; same bits, same order.
    words = np.random.default_rng(0).integers(-(2**31), 2**31, size=(5, 129), dtype=np.int32)  # [N, W]
    expected = unpack_bits(words, 4100)  # [N, V]
    assert expected.shape == (5, 4100) and 0 < expected.mean() < 1
    assert np.array_equal(unpack_bits_torch(torch.from_numpy(words), 4100).numpy(), expected)
    assert expected[0, 0] == words[0, 0] & 1 and expected[1, 33] == (words[1, 1] >> 1) & 1  # bit j of word w
