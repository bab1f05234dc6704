"""Incremental detokenization that never emits a broken UTF-8 character.

The prefix-offset / read-offset algorithm of TGI and vLLM. Decoding one token at a time is wrong: a
byte-level BPE token may hold half of a multi-byte character (it decodes to U+FFFD), and decoders
such as Metaspace or WordPiece treat a sequence's first token differently (no leading space). So the
decoder keeps a small window of recent ids::

    ids:   ... | prefix_offset ........ read_offset ........ end |
                 \\_ already emitted _/ \\_ not emitted yet _/

and on each push decodes ``ids[prefix_offset:read_offset]`` (text already emitted, as context) and
``ids[prefix_offset:]``. When the longer text does not end in U+FFFD its new suffix is complete: it is
emitted, and the window slides (``prefix_offset = read_offset``, ``read_offset = end``). Otherwise the
tail waits for the ids that complete it, and the text before it, when several ids came in one push, is
emitted up to the last id that ends a whole character. Ids before ``prefix_offset`` are dropped, so a push costs
O(window), not O(stream). ``flush`` emits whatever is held back at the end of the stream.

Concatenated deltas plus ``flush()`` equal ``decode(all ids)`` for decoders whose output at a cut between
complete characters does not depend on the ids before the cut (ByteLevel, WordPiece, Metaspace). The one
known exception is ``ByteFallback`` with a run of ``<0x..>`` tokens that is invalid UTF-8 as a whole: the
full decode turns the whole run into U+FFFD, the stream has already emitted its valid start.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
_MAX_CHAR_BYTES = 4  # the longest UTF-8 character


class Decodes(Protocol):
    """Anything that decodes ids to text: ``tokenizers.Tokenizer`` or ``TokenizerBundle``."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of complete text deltas."""

    def __init__(self, tokenizer: Decodes, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # the window: ids[0] is at prefix_offset; older ids are dropped
        self._read = 0  # read_offset, relative to the window: ids[:_read] have been emitted
        self._prefix_text = ""  # decode(ids[:_read]), cached from the previous emission
        self.token_count = 0  # ids pushed so far

    @property
    def window_size(self) -> int:
        """Ids the next push decodes again besides its own: bounded by the text still held back."""
        return len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, ids: Iterable[int]) -> str:
        """Add new ids; return the text they complete ("" while a character is still incomplete)."""
        new = list(ids)
        if not new:
            return ""
        self._ids.extend(new)
        self.token_count += len(new)
        end = len(self._ids)
        text = self._decode(self._ids)
        if not text.endswith(REPLACEMENT_CHAR):
            return self._advance(text, end) if len(text) > len(self._prefix_text) else ""
        # The tail is an incomplete character. When several ids came at once (a coalesced message), the
        # text before it is complete: cut before the tail's last few ids (a character has at most 4 bytes,
        # a token at least 1) and emit up to the longest cut that ends cleanly.
        for cut in range(end - 1, max(self._read, end - _MAX_CHAR_BYTES), -1):
            head = self._decode(self._ids[:cut])
            if not head.endswith(REPLACEMENT_CHAR):
                return self._advance(head, cut) if len(head) > len(self._prefix_text) else ""
        return ""

    def flush(self) -> str:
        """End of stream: return all text held back (an incomplete character comes out as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        return self._advance(self._decode(self._ids), len(self._ids))

    def _advance(self, text: str, cut: int) -> str:
        """Emit ``text`` (the decode of ``ids[:cut]``) past what was emitted; slide the window to ``cut``."""
        delta = text[len(self._prefix_text):]
        # The ids just emitted become the context of the next decode; older ones are dropped.
        del self._ids[: self._read]
        self._read = cut - self._read
        self._prefix_text = self._decode(self._ids[: self._read])
        return delta


def decode_all(tokenizer: Decodes, chunks: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
    """Deltas of ``chunks`` pushed one after another, then the flush (for tests and tools)."""
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
    deltas = [decoder.push(chunk) for chunk in chunks]
    deltas.append(decoder.flush())
    return deltas
