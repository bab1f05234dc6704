"""Which prefix-cache blocks this executor's models hold: what cache-aware routers route by (precise mode).

A model with a prefix cache reports, on its step channel, every block its cache gains and loses
(``modeling.channel``: a whole snapshot when a channel attaches, changes after). The step backend
(``triton_channel``) hands them to ``BlockBook.apply``; the book keeps each model's set and passes every change to
its subscribers, one per router (``executor.channel.ChannelSession``), which put them in their next
``ChannelFrame.blocks``. A router that connects gets a snapshot of every model at once (``subscribe``), so its
view is exact from its first frame on, however many routers there are.

Memory: one Python int in a set per block (about 105 bytes with the set's spare room), bounded by the models'
cache budgets (``prefix_cache_blocks``): the model never holds more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class BlockSubscriber(Protocol):
    def blocks(self, model: str, reset: bool, stored: Sequence[int], removed: Sequence[int]) -> None: ...


class BlockBook:
    def __init__(self) -> None:
        self._held: dict[str, set[int]] = {}  # model -> hashes of the blocks its cache holds
        self._subscribers: set[BlockSubscriber] = set()

    def held(self, model: str) -> frozenset[int]:
        return frozenset(self._held.get(model, ()))

    def __len__(self) -> int:
        return sum(len(held) for held in self._held.values())

    def apply(self, model: str, reset: bool, stored: Sequence[int], removed: Sequence[int]) -> None:
        """``model``'s cache gained ``stored`` and lost ``removed``; with ``reset`` it holds exactly ``stored``."""
        held = self._held.get(model)
        if reset or held is None:  # a change before any snapshot cannot happen (a channel starts with one)
            self._held[model] = set(stored)
        else:
            held.difference_update(removed)
            held.update(stored)
        for subscriber in self._subscribers:
            subscriber.blocks(model, reset, stored, removed)

    def subscribe(self, subscriber: BlockSubscriber) -> None:
        """From now on ``subscriber`` gets every change, and at once a snapshot of every model."""
        self._subscribers.add(subscriber)
        for model, held in self._held.items():
            subscriber.blocks(model, True, list(held), ())

    def unsubscribe(self, subscriber: BlockSubscriber) -> None:
        self._subscribers.discard(subscriber)
