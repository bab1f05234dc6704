"""Constrained decoding (structured output): token masks from llguidance, applied to a batch's logits.

What. A request may carry a constraint spec; its sequence may then only produce tokens that keep the output
a prefix of the language the spec describes, and may end only where the language allows. Specs are JSON text,
exactly one of::

    {"json_object": true}                 any JSON object (OpenAI's response_format json_object)
    {"json_schema": "<schema JSON text>"}  a value valid against the schema (OpenAI's json_schema, strict)
    {"regex": "<pattern>"}                 a full match of the regex (Rust `regex` syntax)
    {"lark": "<grammar>"}                  llguidance's Lark dialect (docs/syntax.md of guidance-ai/llguidance)

How. ``GrammarCompiler`` holds one ``llguidance.LLTokenizer`` built from the checkpoint's ``tokenizer.json``
(no ``transformers``), widened to the model's logits width, so ids past the tokenizer's vocabulary exist as
empty tokens that no grammar ever allows. ``compile()`` turns a spec into an llguidance grammar, builds one
``LLMatcher`` to prove it compiles (an unknown keyword, a bad regex or Lark rule raises ``ConstraintError``)
and keeps it in an LRU cache; ``Grammar.matcher()`` deep-copies that prototype for each sequence. JSON is
compiled with llguidance's ``whitespace_flexible: false`` and separators ``,`` / ``:``, overriding any
``x-guidance`` in the schema: the output is compact and, where the schema fixes the keys (strict mode: all
required, no additional properties), the keys come in the schema's order, so the only free choices are the
values. Nothing else bounds the length: strings without ``maxLength``, integers without ``maximum`` and arrays
without ``maxItems`` may run until ``max_tokens`` (finish "length", the output then unparsable, as in OpenAI).

Per step the scheduler calls ``apply_masks(logits, rows)`` and, once a token is chosen, ``Matcher.accept``.
``apply_masks`` allocates one int32 bitmask ``[N, ceil(V/32)]`` on the CPU for the N constrained rows, has
llguidance's executor fill the rows in parallel on its own thread pool (the GIL released), expands it to
``[N, V]`` booleans (numpy on the CPU; for an accelerator the packed words are copied and expanded there) and
writes ``-inf`` into the disallowed logits with one ``masked_fill`` (indexed when only some rows are
constrained). The eos ids are allowed exactly where the grammar may end (llguidance sets every
eos id given to the tokenizer). Free rows are never touched.

Costs (``python -m bench.constrained``; figures in docs/structured-output.md): with tiny-llama's 4096 tokens,
compiling a small schema takes under a millisecond, a ``matcher()`` copy about a microsecond, ``accept`` 1-3 µs,
and a mask 8-22 µs per row at batch 32 (65 µs for a lone row), of which llguidance's fill is the smaller part:
the rest is unpacking the bits and ``masked_fill``, both linear in V. The mask is computed on the CPU while the
next forward waits for it (no overlap). The bitmask is V/8 bytes a row, allocated per call.
"""

from __future__ import annotations

import json
import pathlib
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np
import torch

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Compact, deterministic JSON: no optional whitespace (a sampled model otherwise may emit spaces and newlines
# without end), fixed separators. Applied as overrides, so a schema's own `x-guidance` cannot loosen them.
_JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ",",
    "key_separator": ":",
}
# Short error messages (no parser-state dump, no grammar text echoed back into an HTTP 400 or a log).
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


class ConstraintError(ValueError):
    """A spec that cannot be compiled, or a token the grammar does not allow; the message says why."""


def _json_object(value: object) -> str:
    if value is not True:
        raise ConstraintError(f'"json_object" must be true, got {value!r}')
    return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)


def _json_schema(value: object) -> str:
    if not isinstance(value, str):
        raise ConstraintError(f'"json_schema" must be the schema as JSON text, got {type(value).__name__}')
    try:
        schema = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConstraintError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ConstraintError(f"the JSON schema must be a JSON object, got {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except ValueError as e:
        raise ConstraintError(f"invalid JSON schema: {e}") from None


def _text_grammar(kind: str, build: Callable[[str], str]) -> Callable[[object], str]:
    def compile_text(value: object) -> str:
        if not isinstance(value, str) or not value:
            raise ConstraintError(f'"{kind}" must be a non-empty string')
        return build(value)

    return compile_text


# The spec's one key -> a function from its value to an llguidance grammar (text; checked by LLMatcher).
_SPEC_KINDS: dict[str, Callable[[object], str]] = {
    "json_object": _json_object,
    "json_schema": _json_schema,
    "regex": _text_grammar("regex", llguidance.LLMatcher.grammar_from_regex),
    "lark": _text_grammar("lark", llguidance.LLMatcher.grammar_from_lark),
}


def grammar_text(spec: str) -> str:
    """Parse a spec (JSON text with exactly one of ``_SPEC_KINDS``) into llguidance grammar text."""
    try:
        parsed: Any = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ConstraintError(f"the constraint spec is not valid JSON: {e}") from None
    kinds = ", ".join(_SPEC_KINDS)
    if not isinstance(parsed, dict) or len(parsed) != 1:
        raise ConstraintError(f"the constraint spec must be a JSON object with exactly one of: {kinds}")
    ((kind, value),) = parsed.items()
    if kind not in _SPEC_KINDS:
        raise ConstraintError(f"unknown constraint kind {kind!r}; expected one of: {kinds}")
    return _SPEC_KINDS[kind](value)


class Matcher:
    """One sequence's position in its grammar. Not thread-safe; one owner (the scheduler's step loop)."""

    __slots__ = ("_executor", "_matcher", "vocab_size")

    def __init__(self, matcher: llguidance.LLMatcher, executor: llguidance.LLExecutor, vocab_size: int) -> None:
        self._matcher, self._executor, self.vocab_size = matcher, executor, vocab_size

    def accept(self, token_id: int) -> None:
        """Advance by one token; raises ``ConstraintError`` if the grammar did not allow it (state is then dead)."""
        if not self._matcher.consume_token(token_id):
            reason = self._matcher.get_error().split("\n", 1)[0]
            raise ConstraintError(f"token {token_id} is not allowed by the constraint here: {reason}")

    def is_finished(self) -> bool:
        """The grammar is complete and cannot be extended: only an eos id may follow.

        Also true once the matcher is in error (see ``error``): its masks then allow only the eos ids.
        """
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        """Why the matcher is dead (a disallowed token, or a parser limit hit while computing a mask), or None."""
        return (self._matcher.get_error() or "unknown error") if self._matcher.is_error() else None

    def is_accepting(self) -> bool:
        """The output so far is complete (an eos id is allowed), though it may also go on."""
        return self._matcher.is_accepting()


class Grammar:
    """A compiled spec; cheap to share. ``matcher()`` gives each sequence its own state."""

    __slots__ = ("_executor", "_prototype", "_vocab_size", "spec")

    def __init__(self, spec: str, prototype: llguidance.LLMatcher, executor: llguidance.LLExecutor,
                 vocab_size: int) -> None:
        self.spec, self._prototype, self._executor, self._vocab_size = spec, prototype, executor, vocab_size

    def matcher(self) -> Matcher:
        # A deep copy of a matcher that has consumed nothing: microseconds, against a fresh LLMatcher's lexer build.
        return Matcher(self._prototype.deep_copy(), self._executor, self._vocab_size)


class GrammarCompiler:
    """Compiles constraint specs against one model's tokenizer; keeps the last ``cache_size`` grammars."""

    def __init__(self, tokenizer_dir: pathlib.Path, vocab_size: int, eos_ids: frozenset[int], *,
                 cache_size: int = 64, threads: int | None = None) -> None:
        assert eos_ids, "constrained decoding needs at least one eos id (the grammar's end)"
        assert all(0 <= i < vocab_size for i in eos_ids), f"eos ids {sorted(eos_ids)} outside [0, {vocab_size})"
        assert cache_size >= 1, f"cache_size must be >= 1, got {cache_size}"
        assert sys.byteorder == "little", "apply_masks reads llguidance's u32 mask words as little-endian bytes"
        text = (pathlib.Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8")
        try:
            # n_vocab widens the token table to the logits width; llguidance refuses a narrower one.
            self.tokenizer = llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=sorted(eos_ids))
        except ValueError as e:
            raise ValueError(f"cannot build the llguidance tokenizer from {tokenizer_dir}: {e}") from e
        self.vocab_size, self.eos_ids = vocab_size, eos_ids
        # One thread pool per compiler, shared by every apply_masks() on its matchers (None: 80 % of the CPUs).
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: str) -> Grammar:
        """The grammar for ``spec`` (see the module docstring); raises ``ConstraintError`` saying why not."""
        with self._lock:
            grammar = self._cache.get(spec)
            if grammar is not None:
                self._cache.move_to_end(spec)
                return grammar
        prototype = llguidance.LLMatcher(self.tokenizer, grammar_text(spec), log_level=0, limits=_LIMITS)
        if prototype.is_error():
            raise ConstraintError(f"the constraint does not compile: {prototype.get_error().strip()}")
        grammar = Grammar(spec, prototype, self.executor, self.vocab_size)
        with self._lock:
            self._cache[spec] = grammar
            self._cache.move_to_end(spec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar


def unpack_bits(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """[N, W] int32 words -> [N, vocab] uint8 0/1; numpy's one C loop, several times faster than torch's ops."""
    return np.unpackbits(bitmask.view(np.uint8), axis=1, count=vocab, bitorder="little")


def unpack_bits_torch(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The same on any device: [N, W] int32 -> [N, vocab] int32 0/1."""
    n, words = bits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)  # [32]
    return ((bits.unsqueeze(-1) >> shifts) & 1).view(n, words * 32)[:, :vocab]  # [N, V]


def apply_masks(logits: torch.Tensor, rows: list[tuple[int, Matcher]]) -> None:
    """Set to -inf, in place, every logit that row's matcher does not allow at this step.

    ``logits`` is ``[R, V]`` (any device, any float dtype); ``rows`` pairs distinct row indices with their
    matchers (all from one ``GrammarCompiler``). Rows not listed are left alone.
    """
    if not rows:
        return
    assert logits.dim() == 2, f"logits must be [R, V], got {tuple(logits.shape)}"
    n, vocab = len(rows), logits.shape[1]
    first = rows[0][1]
    assert vocab == first.vocab_size, f"logits width {vocab} != the compiler's vocab_size {first.vocab_size}"
    assert all(matcher._executor is first._executor for _, matcher in rows), "matchers of several compilers"
    words = (vocab + 31) // 32
    bitmask = np.zeros((n, words), dtype=np.int32)  # [N, W]: bit j of word w = token 32w + j
    llguidance_rows = [(matcher._matcher, i) for i, (_, matcher) in enumerate(rows)]
    first._executor.unsafe_compute_mask_ptr(llguidance_rows, bitmask.ctypes.data, words * 4, n)

    device = logits.device
    if device.type == "cpu":
        disallowed = torch.from_numpy(unpack_bits(bitmask, vocab) == 0)  # [N, V]
    else:
        # An accelerator gets the packed words (V/8 bytes a row) and expands them where the logits are.
        disallowed = unpack_bits_torch(torch.from_numpy(bitmask).to(device), vocab) == 0
    indices = [row for row, _ in rows]
    if indices == list(range(logits.shape[0])):  # every row constrained, in order: no gather/scatter
        logits.masked_fill_(disallowed, float("-inf"))
        return
    index = torch.tensor(indices, dtype=torch.long, device=device)  # [N]
    logits[index] = logits[index].masked_fill(disallowed, float("-inf"))
