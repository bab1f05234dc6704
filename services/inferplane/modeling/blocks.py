"""The names of prompt blocks: one chained hash, shared by the model's prefix cache and the router's cache-aware
routing (``inferplane.router.prefix_index``), so that both name the same prompt's blocks alike.

A prompt is cut into blocks of ``block_size`` tokens. Block i is named by the hash of (block i-1's hash, block i's
token ids): a block's hash names its whole prefix. Standard library only: the router imports it without torch, and
the executor's renderer copies it into each LLM's model folder with the rest of ``inferplane.modeling``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

ROOT_HASH = 0  # the parent of a prompt's first block
DEFAULT_BLOCK_SIZE = 16


def block_hash(parent: int, token_ids: Sequence[int]) -> int:
    """The chained hash of one block: 64 bits of BLAKE2b over the parent's hash and the block's token ids."""
    h = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in token_ids))
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, limit: int | None = None) -> list[int]:
    """The hashes of the full blocks of ``token_ids``, in order (a partial last block has none); at most ``limit``."""
    hashes: list[int] = []
    parent = ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        if limit is not None and len(hashes) >= limit:
            break
        parent = block_hash(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


class BlockChanges:
    """What a reader of a set of block hashes has yet to be told: each block's last change since the last ``take``
    (gained or lost), or, after ``snapshot``, the whole set with later changes merged into it. The model's channel
    hub keeps one per channel, the executor's frame builder one per model: a slow reader gets the net change."""

    __slots__ = ("_changes", "reset")

    def __init__(self) -> None:
        self.reset = False  # the pending blocks are the whole set, not a change
        self._changes: dict[int, bool] = {}  # block hash -> gained (True) or lost

    def __bool__(self) -> bool:
        return self.reset or bool(self._changes)

    def snapshot(self, held: Iterable[int]) -> None:
        self.reset, self._changes = True, dict.fromkeys(held, True)

    def change(self, stored: Iterable[int], removed: Iterable[int]) -> None:
        for h in removed:
            if self.reset:  # a snapshot lists only what is held
                self._changes.pop(h, None)
            else:
                self._changes[h] = False
        for h in stored:
            self._changes[h] = True

    def take(self) -> tuple[bool, list[int], list[int]]:
        """(reset, stored, removed), disjoint; the pending changes start afresh."""
        reset, changes = self.reset, self._changes
        self.reset, self._changes = False, {}
        return reset, [h for h, held in changes.items() if held], [h for h, held in changes.items() if not held]
