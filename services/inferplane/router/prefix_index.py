"""Cache-aware routing's index: which prompt blocks each executor replica holds in its prefix cache.

Precise, where the replica reports its blocks: an executor whose model has a prefix cache and runs on the step
path sends, on this router's channel to it, the hashes of every block the model's cache gains and loses
(``ChannelFrame.blocks``: a snapshot when the channel opens, changes after; ``executor/block_book.py``).
``apply`` keeps them as one set per (model, replica): the index then knows what the replica holds, evictions
caused by other routers' requests included. A channel that breaks drops the replica's sets (``lost``): the next
channel starts with a snapshot. Memory: one int in a set per block, about 105 bytes with the set's spare room
(measured in ``tests/unit/test_prefix_index.py``), bounded by the model's cache budget (the replica never reports
more; the index refuses more than ``max_precise`` per set).

Approximate, for a replica that does not report (a model served per request, or ``executor_transport:
generate``; docs/router.md): the router records, per model and replica, the block hashes of the prompts it sent
there (``inferplane.modeling.blocks``: the very hash the model's prefix cache names its blocks by), in LRU order and
bounded by the model's cache budget (the catalog's ``prefix_cache_blocks``), as the model's own pool ages them: a
prompt's chain is touched head last, so an old chain's tail goes before its head. It does not see what the model
evicts for prompts other routers sent, nor a model restarted without its health going down; a wrong guess costs a
recomputed prefix, never a wrong answer (the model matches tokens, not this index).

Memory: at most ``capacity`` hashes per (model, replica); one entry of the ``OrderedDict`` (the key's int and the
dict's slots and the order's links, with the tables' spare room) is about 160 bytes on CPython 3.11
(``tests/unit/test_prefix_index.py`` measures it): about 1.3 KB per 128 prompt tokens with 16-token blocks, bounded
by the budget (two replicas of 394 blocks: about 125 KB).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from inferplane.modeling.blocks import block_hashes

Policy = Literal["cache_aware", "p2c", "random"]
POLICIES: tuple[Policy, ...] = ("cache_aware", "p2c", "random")


@dataclass(frozen=True, slots=True)
class Prefix:
    """A prompt's leading block hashes, and its model's prefix cache budget (blocks per replica)."""

    hashes: tuple[int, ...]
    capacity: int

    @classmethod
    def of(cls, token_ids: Sequence[int], *, block_size: int, capacity: int) -> Prefix:
        return cls(tuple(block_hashes(token_ids, block_size, limit=capacity)), capacity)


MAX_PRECISE = 1 << 20  # blocks per (model, replica) the precise index keeps at most (a guard: budgets are smaller)


class PrefixIndex:
    def __init__(self, *, max_precise: int = MAX_PRECISE) -> None:
        self._held: dict[tuple[str, str], OrderedDict[int, None]] = {}  # (model, address) -> hashes, oldest first
        self._precise: dict[tuple[str, str], set[int]] = {}  # (model, address) -> the hashes it reported holding
        self._max_precise = max_precise

    def __len__(self) -> int:
        """Block hashes held, over every model and replica, both kinds."""
        return self.approximate_blocks() + self.precise_blocks()

    def approximate_blocks(self) -> int:
        return sum(len(held) for held in self._held.values())

    def precise_blocks(self) -> int:
        return sum(len(held) for held in self._precise.values())

    def is_precise(self, model: str, address: str) -> bool:
        return (model, address) in self._precise

    def reported(self, model: str, address: str) -> frozenset[int] | None:
        """The blocks ``address`` reported holding for ``model``; None where it does not report."""
        held = self._precise.get((model, address))
        return None if held is None else frozenset(held)

    def matched(self, model: str, address: str, hashes: Sequence[int]) -> int:
        """How many of ``hashes``' leading blocks ``address`` holds (a chain stops at its first miss)."""
        held: set[int] | OrderedDict[int, None] | None = self._precise.get((model, address))
        if held is None:
            held = self._held.get((model, address))
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def record(self, model: str, address: str, prefix: Prefix) -> None:
        """``address`` prefilled a prompt with these blocks: they are its most recent; the oldest beyond the budget
        go. The chain is touched deepest first (as the model releases it), so its head is the most recent. A no-op
        where the replica reports its blocks (its own report came with the request's first token)."""
        if prefix.capacity <= 0 or not prefix.hashes or (model, address) in self._precise:
            return
        held = self._held.setdefault((model, address), OrderedDict())
        for h in reversed(prefix.hashes):
            held[h] = None
            held.move_to_end(h)
        while len(held) > prefix.capacity:
            held.popitem(last=False)

    def apply(self, model: str, address: str, reset: bool, stored: Sequence[int], removed: Sequence[int]) -> None:
        """The replica reported its model's blocks: gained ``stored`` and lost ``removed``; with ``reset``, it holds
        exactly ``stored``. The replica's guesses (``record``) for the model are dropped: reports replace them."""
        key = (model, address)
        held = self._precise.get(key)
        if reset or held is None:
            held = self._precise[key] = set()
            self._held.pop(key, None)
        else:
            held.difference_update(removed)
        room = self._max_precise - len(held)
        if len(stored) <= room:
            held.update(stored)
        else:  # more than any budget: a faulty report; keep what fits
            held.update(stored[:max(room, 0)])

    def lost(self, address: str) -> None:
        """The replica's reports stopped (its channel broke): back to guessing until a new channel's snapshot."""
        for key in [k for k in self._precise if k[1] == address]:
            del self._precise[key]

    def forget_guesses(self, address: str) -> None:
        """The replica restarted (its health went down and up): what the router guessed it holds is gone; what it
        reports is kept (a new channel's snapshot replaces it)."""
        for key in [k for k in self._held if k[1] == address]:
            del self._held[key]

    def forget(self, address: str) -> None:
        """The replica is gone: nothing of it is kept."""
        self.forget_guesses(address)
        self.lost(address)


class Loaded(Protocol):
    address: str

    def load(self) -> int: ...


R = TypeVar("R", bound=Loaded)


def power_of_two(candidates: Sequence[R], rng: random.Random) -> R:
    """Power of two choices: the less loaded of two random replicas (ties: the first drawn)."""
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(list(candidates), 2)
    return a if a.load() <= b.load() else b


def choose_cached(candidates: Sequence[R], model: str, prefix: Prefix, index: PrefixIndex, rng: random.Random, *,
                  max_imbalance: int, min_match: float,
                  fallback: Callable[[Sequence[R], random.Random], R] = power_of_two) -> tuple[R, str]:
    """The replica holding the longest run of the prompt's leading blocks (ties: the least loaded, then chance),
    and why: ``cached``; or power of two choices when the best match is poor (fewer blocks than ``min_match`` of the
    prompt's, and at least one: ``poor_match``) or its replica holds more than ``max_imbalance`` requests above the
    least-loaded candidate (``imbalanced``, Ray Serve's rule)."""
    matched = [index.matched(model, r.address, prefix.hashes) for r in candidates]
    best = max(matched, default=0)
    if best == 0 or best < min_match * len(prefix.hashes):
        return fallback(candidates, rng), "poor_match"
    tied = [r for r, m in zip(candidates, matched, strict=True) if m == best]
    rng.shuffle(tied)
    replica = min(tied, key=lambda r: r.load())
    if replica.load() > min(r.load() for r in candidates) + max_imbalance:
        return fallback(candidates, rng), "imbalanced"
    return replica, "cached"
