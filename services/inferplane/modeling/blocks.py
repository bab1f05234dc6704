"""The names of prompt blocks: one chained hash, shared by the model's prefix cache and the router's cache-aware
routing (``inferplane.router.prefix_index``), so that both name the same prompt's blocks alike.

A prompt is cut into blocks of ``block_size`` tokens. Block i is named by the hash of (block i-1's hash, block i's
token ids): a block's hash names its whole prefix. Standard library only: the router imports it without torch, and
the executor's renderer copies it into each LLM's model folder with the rest of ``inferplane.modeling``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

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
