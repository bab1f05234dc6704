"""Prefix caching: the keys and values of full blocks of prompt tokens, kept after a prefill and reused by a later
prompt that starts with the same tokens.

A prompt is cut into blocks of ``block_size`` tokens. Block i is named by a chained hash: the hash of (block
i-1's hash, block i's token ids), so a block names its whole prefix, and two prompts share block i only when
they share every token up to its end. The index maps a hash to a slot of the pool; a match also compares the
block's stored tokens and parent, so a hash collision can never reuse the wrong keys.

The pool is one tensor pair per model, [L, H_kv, N, block_size, D] (``N`` = ``capacity`` blocks, the memory
budget: ``bytes_per_block`` each). The scheduler's KV cache is static, one row per sequence, so reuse means copying:
``load`` copies matched blocks into the new sequence's row before its prefill, which then computes only the rest
of the prompt; ``store`` copies a prefilled prompt's new full blocks from its row into the pool.

Reference counts: ``match`` takes a reference on each block it returns and ``release`` gives it back; a referenced
block is never evicted, so blocks matched for a prefill survive the ``store`` of other prompts in the same step.
Unreferenced blocks wait in LRU order and the least recently used is evicted when a block is needed. A sequence's
blocks are released deepest first, so a chain's tail is evicted before its head (a block whose parent was evicted
can no longer be matched; it only waits for its own eviction).

Changes: every block gained (``store``) or lost (eviction) is noted by hash until ``take_changes``, which the model
publishes to the executor (and the executor to every router) so that cache-aware routing knows exactly which
blocks each replica holds (``modeling/channel.py``, docs/prefix-cache.md).

Single-threaded: the scheduler's stepping thread is its only user. Imports torch and the standard library only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from inferplane.modeling.blocks import DEFAULT_BLOCK_SIZE, ROOT_HASH, BlockChanges, block_hash, block_hashes
from inferplane.modeling.llama.model import LlamaForCausalLM

# The block hash lives in ``inferplane.modeling.blocks`` (stdlib only), which the router imports too.
__all__ = ["DEFAULT_BLOCK_SIZE", "ROOT_HASH", "PrefixCache", "PrefixMatch", "PrefixStats", "block_hash", "block_hashes"]


@dataclass(slots=True)
class _Block:
    hash: int
    parent: int
    tokens: tuple[int, ...]
    refs: int = 0


@dataclass(frozen=True, slots=True)
class PrefixStats:
    blocks_total: int  # the pool's capacity
    blocks_used: int  # blocks holding a cached prefix
    blocks_referenced: int  # of those, held by a prefill now
    hits: int = 0  # prompt tokens reused since start
    queried: int = 0  # prompt tokens looked up since start
    evictions: int = 0


@dataclass(slots=True)
class PrefixMatch:
    """The blocks a prompt reuses (referenced until ``PrefixCache.release``); ``tokens`` = len(blocks) * block_size."""

    blocks: list[int] = field(default_factory=list)
    tokens: int = 0


class PrefixCache:
    """A pool of ``capacity`` KV blocks of ``block_size`` tokens for ``model``'s layers (see the module docstring)."""

    def __init__(self, model: LlamaForCausalLM, *, capacity: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        assert capacity >= 1, f"capacity must be >= 1 block, got {capacity}"
        assert block_size >= 1, f"block_size must be >= 1, got {block_size}"
        cfg = model.config
        self.block_size, self.capacity = block_size, capacity
        shape = (cfg.num_hidden_layers, cfg.n_kv_heads, capacity, block_size, cfg.d_head)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)  # [L, H_kv, N, B, D]
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)  # [L, H_kv, N, B, D]
        self._blocks: list[_Block | None] = [None] * capacity  # pool slot -> the block it holds
        self._index: dict[int, int] = {}  # block hash -> pool slot
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced pool slots, least recently used first
        self._free = list(range(capacity - 1, -1, -1))  # never-used pool slots (a stack: lowest first)
        self._hits = self._queried = self._evictions = 0
        self._used = self._referenced = 0  # blocks held, and of those referenced: kept as counts (stats is cheap)
        self._changes = BlockChanges()  # blocks gained and lost since the last take_changes

    @staticmethod
    def bytes_per_block(model: LlamaForCausalLM, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
        cfg = model.config
        return 2 * cfg.num_hidden_layers * cfg.n_kv_heads * block_size * cfg.d_head * model.dtype.itemsize

    @property
    def stats(self) -> PrefixStats:
        return PrefixStats(self.capacity, self._used, self._referenced, self._hits, self._queried, self._evictions)

    # ------------------------------------------------------------------ the index

    def match(self, token_ids: Sequence[int]) -> PrefixMatch:
        """The longest cached chain of full blocks that ``token_ids`` starts with, leaving at least its last token
        to compute (its logits start the completion); each block returned is referenced."""
        usable = (len(token_ids) - 1) // self.block_size  # full blocks before the last token
        self._queried += len(token_ids)
        found = PrefixMatch()
        parent = ROOT_HASH
        for i in range(usable):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = block_hash(parent, tokens)
            slot = self._index.get(h)
            block = None if slot is None else self._blocks[slot]
            if block is None or block.tokens != tokens or block.parent != parent:
                break
            assert slot is not None
            self._ref(slot, block)
            found.blocks.append(slot)
            parent = h
        found.tokens = len(found.blocks) * self.block_size
        self._hits += found.tokens
        return found

    def release(self, match: PrefixMatch) -> None:
        """Give back ``match``'s references; blocks no longer referenced become evictable (deepest first)."""
        for slot in reversed(match.blocks):
            block = self._blocks[slot]
            assert block is not None and block.refs > 0, f"pool slot {slot} released more often than matched"
            block.refs -= 1
            if block.refs == 0:
                self._referenced -= 1
                self._lru[slot] = None
        match.blocks, match.tokens = [], 0

    def _ref(self, slot: int, block: _Block) -> None:
        if block.refs == 0:
            self._lru.pop(slot, None)
            self._referenced += 1
        block.refs += 1

    def _allocate(self) -> int | None:
        """A pool slot for a new block: a never-used one, else the least recently used unreferenced one."""
        if self._free:
            return self._free.pop()
        if not self._lru:
            return None  # every block is referenced
        slot, _ = self._lru.popitem(last=False)
        old = self._blocks[slot]
        assert old is not None and old.refs == 0
        del self._index[old.hash]
        self._changes.change((), (old.hash,))
        self._blocks[slot] = None
        self._evictions += 1
        self._used -= 1
        return slot

    def take_changes(self) -> tuple[list[int], list[int]]:
        """The hashes of the blocks gained and of those lost since the last call: disjoint, each block's last change
        (one gained and then lost in between is reported lost, which is harmless where it was not held before)."""
        _, stored, removed = self._changes.take()
        return stored, removed

    def held(self) -> list[int]:
        """The hashes of every block the pool holds now."""
        return list(self._index)

    # ------------------------------------------------------------------ keys and values

    def load(self, model: LlamaForCausalLM, match: PrefixMatch, row: int) -> None:
        """Copy ``match``'s blocks into cache row ``row`` at positions [0, match.tokens) of every layer."""
        if not match.blocks:
            return
        ids = torch.tensor(match.blocks, dtype=torch.long, device=self.k.device)  # [n]
        for layer, cache in enumerate(model.kv_caches()):
            heads, _, _, dim = self.k[layer].shape
            k = self.k[layer][:, ids].reshape(heads, match.tokens, dim)  # [H_kv, n*B, D]
            v = self.v[layer][:, ids].reshape(heads, match.tokens, dim)  # [H_kv, n*B, D]
            cache.k[row, :, :match.tokens] = k
            cache.v[row, :, :match.tokens] = v

    def store(self, model: LlamaForCausalLM, token_ids: Sequence[int], row: int) -> int:
        """Keep the full blocks of the prompt ``token_ids``, prefilled into cache row ``row``, that the pool lacks;
        return how many blocks were added. Stops at the first block it cannot place (every slot referenced)."""
        parent, new_slots, new_starts = ROOT_HASH, [], []
        pinned = PrefixMatch()  # the chain's blocks already cached: held while deeper ones are placed
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            tokens = tuple(token_ids[start:start + self.block_size])
            h = block_hash(parent, tokens)
            slot = self._index.get(h)
            if slot is not None:
                block = self._blocks[slot]
                assert block is not None
                if block.tokens != tokens or block.parent != parent:
                    break  # a hash collision: keep what is there, cache nothing deeper
                self._ref(slot, block)  # not evicted to make room for its own descendants
                pinned.blocks.append(slot)
            else:
                slot = self._allocate()
                if slot is None:
                    break
                self._blocks[slot] = _Block(h, parent, tokens)
                self._index[h] = slot
                self._changes.change((h,), ())
                self._used += 1
                new_slots.append(slot)
                new_starts.append(start)
            parent = h
        self.release(pinned)  # now the most recently used
        # New blocks are unreferenced: evictable, the deepest first
        for slot in reversed(new_slots):
            self._lru[slot] = None
        if new_slots:
            self._copy_out(model, row, new_slots, new_starts)
        return len(new_slots)

    def _copy_out(self, model: LlamaForCausalLM, row: int, slots: list[int], starts: list[int]) -> None:
        bsz = self.block_size
        ids = torch.tensor(slots, dtype=torch.long, device=self.k.device)  # [n]
        # positions of the new blocks' tokens in the row, block by block: [n, B]
        positions = (torch.tensor(starts, dtype=torch.long, device=self.k.device)[:, None]
                     + torch.arange(bsz, device=self.k.device)[None, :])
        for layer, cache in enumerate(model.kv_caches()):
            self.k[layer][:, ids] = cache.k[row][:, positions]  # [H_kv, n, B, D]
            self.v[layer][:, ids] = cache.v[row][:, positions]

