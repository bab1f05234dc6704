"""Incremental detokenization that never emits a broken UTF-8 character.

The prefix-offset / read-offset algorithm of TGI and vLLM, run by ``tokenizers``' ``DecodeStream`` (the same
algorithm in Rust: one call per token). Decoding one token at a time is wrong: a byte-level BPE token may hold
half of a multi-byte character (it decodes to U+FFFD), and decoders such as Metaspace or WordPiece treat a
sequence's first token differently (no leading space). So the stream keeps a small window of recent ids::

    ids:   ... | prefix ............ | pending ............ |
                 \\_ last emitted _/   \\_ not emitted yet _/

and on each id decodes ``prefix + pending``. When that text does not end in U+FFFD and is longer than
``decode(prefix)`` its new suffix is complete: it is emitted, and the window slides (``prefix = pending``).
Otherwise the tail waits for the ids that complete it. Ids before ``prefix`` are dropped, so a token costs
O(window), not O(stream). Several ids in one push are stepped one by one, so the text before an incomplete
tail comes out at once. ``flush`` emits whatever is held back at the end of the stream.

Concatenated deltas plus ``flush()`` equal ``decode(all ids)`` for decoders whose output at a cut between
complete characters does not depend on the ids before the cut (ByteLevel, WordPiece, Metaspace). The one
known exception is ``ByteFallback`` with a run of ``<0x..>`` tokens that is invalid UTF-8 as a whole: the
full decode turns the whole run into U+FFFD, the stream has already emitted its valid start. There the window's
text no longer starts with the emitted prefix; ``DecodeStream`` refuses such a step, and the decoder emits the
window's text past the prefix's length, as the Python version of this algorithm did.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

REPLACEMENT_CHAR = "\ufffd"


class Decodes(Protocol):
    """A loaded tokenizer with its id check: ``TokenizerBundle``."""

    tokenizer: Tokenizer

    def check_ids(self, ids: Sequence[int]) -> None: ...


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of complete text deltas."""

    __slots__ = ("_check", "_pending", "_prefix", "_skip", "_stream", "_tokenizer", "token_count")

    def __init__(self, tokenizer: Tokenizer | Decodes, skip_special_tokens: bool = True) -> None:
        # A bare ``tokenizers.Tokenizer`` (tests, tools) or a bundle, whose ``check_ids`` refuses ids outside
        # the vocabulary (``InvalidArgument``) where the Rust decoder would skip them silently.
        if isinstance(tokenizer, Tokenizer):
            self._tokenizer, self._check = tokenizer, None
        else:
            self._tokenizer, self._check = tokenizer.tokenizer, tokenizer.check_ids
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._prefix: list[int] = []  # the ids of the last emission: the context of the next decode
        self._pending: list[int] = []  # ids pushed since, not emitted yet
        self.token_count = 0  # ids pushed so far

    @property
    def window_size(self) -> int:
        """Ids the next push decodes again besides its own: bounded by the text still held back."""
        return len(self._prefix) + len(self._pending)

    def push(self, ids: Iterable[int]) -> str:
        """Add new ids; return the text they complete ("" while a character is still incomplete)."""
        new = ids if isinstance(ids, list) else list(ids)
        if not new:
            return ""
        if self._check is not None:
            self._check(new)
        self.token_count += len(new)
        if len(new) == 1:  # the common case: one token per message
            return self._step(new[0]) or ""
        return "".join(piece for i in new if (piece := self._step(i)) is not None)

    def _step(self, token_id: int) -> str | None:
        self._pending.append(token_id)
        try:
            piece = self._stream.step(self._tokenizer, token_id)
        except Exception:  # the window's text does not start with the prefix's (see the module's docstring)
            return self._emit_past_prefix()
        if piece is not None:
            self._prefix, self._pending = self._pending, []
        return piece

    def _emit_past_prefix(self) -> str | None:
        """What the Python algorithm emitted: the window's text past the prefix text's length (the stream, which
        refused, starts again from the new prefix)."""
        text = self._decode(self._prefix + self._pending)
        prefix_text = self._decode(self._prefix)
        if text.endswith(REPLACEMENT_CHAR) or len(text) <= len(prefix_text):
            return None
        self._slide()
        return text[len(prefix_text):]

    def flush(self) -> str:
        """End of stream: return all text held back (an incomplete character comes out as U+FFFD)."""
        if not self._pending:
            return ""
        text = self._decode(self._prefix + self._pending)
        delta = text[len(self._decode(self._prefix)):]
        self._slide()
        return delta

    def _slide(self) -> None:
        """The pending ids become the prefix, and a new stream continues from them."""
        self._prefix, self._pending = self._pending, []
        self._stream = DecodeStream(ids=self._prefix, skip_special_tokens=self._skip)

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=self._skip))


def decode_all(tokenizer: Tokenizer | Decodes, chunks: Sequence[Sequence[int]],
               skip_special_tokens: bool = True) -> list[str]:
    """Deltas of ``chunks`` pushed one after another, then the flush (for tests and tools)."""
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
    deltas = [decoder.push(chunk) for chunk in chunks]
    deltas.append(decoder.flush())
    return deltas
