"""Stop sequences on streamed text: emit what can no longer be part of a match, hold back the rest."""

from __future__ import annotations


class StopMatcher:
    """Feed text deltas; get back the text safe to send and whether a stop sequence matched.

    Text that could still be the start of a stop sequence is held back until the next delta decides
    it; on a match, everything from the stop sequence on is dropped (OpenAI does not return it).
    """

    def __init__(self, stops: list[str]) -> None:
        assert all(stops), "stop sequences must be non-empty"
        self._stops = stops
        self._held = ""
        self._longest = max((len(s) for s in stops), default=0)
        self.matched = False
        self.which: str | None = None  # the stop sequence that matched (the earliest in the text)

    def feed(self, text: str) -> str:
        if self.matched:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        cut, which = min(((i, s) for s in self._stops if (i := buf.find(s)) >= 0), default=(-1, None))
        if which is not None:
            self.matched, self.which = True, which
            self._held = ""
            return buf[:cut]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back text, at the end of a generation that matched no stop sequence."""
        held, self._held = ("" if self.matched else self._held), ""
        return held

    def _partial_suffix(self, buf: str) -> int:
        # Length of the longest suffix of buf that is a proper prefix of some stop sequence.
        for n in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
