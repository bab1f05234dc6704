"""The prefix cache (services/inferplane/modeling/llama/prefix_cache.py) and the scheduler's use of it.

The block index on its own (hash chain, hits, refcounts, LRU eviction under the budget), then the scheduler with
and without a cache: greedy tokens identical on a seeded random Llama and on the shipped tiny-llama, batched
prefills that mix hits and misses, and ``cached_tokens`` exactly the reused tokens.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from inferplane.assets import TINY_LLAMA
from inferplane.modeling.llama import LlamaConfig, LlamaForCausalLM, load_model
from inferplane.modeling.llama.batching import (
    BatchScheduler,
    FinishEvent,
    SequenceRequest,
    TokenEvent,
    _length_groups,
)
from inferplane.modeling.llama.prefix_cache import ROOT_HASH, PrefixCache, block_hash, block_hashes

EOS = frozenset({1})


def seeded_model(seed: int = 0, max_pos: int = 128) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max_pos,
                      rope_theta=5000.0, eos_token_id=1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.ndim == 2 else 1.0)
    return model.eval()


def ids(n: int, seed: int, vocab: int = 97) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(scheduler: BatchScheduler, schedule: dict[int, list[SequenceRequest]]
        ) -> tuple[dict[object, list[int]], dict[object, FinishEvent]]:
    tokens: dict[object, list[int]] = {}
    finish: dict[object, FinishEvent] = {}
    step, schedule = 0, dict(schedule)
    while schedule or scheduler.has_work():
        for req in schedule.pop(step, []):
            scheduler.add(req)
        for ev in scheduler.step():
            if isinstance(ev, TokenEvent):
                tokens.setdefault(ev.id, []).append(ev.token_id)
            else:
                finish[ev.id] = ev
        step += 1
        assert step < 10_000
    return tokens, finish


# ---------------------------------------------------------------- the block index


def test_block_hashes_chain_over_the_whole_prefix() -> None:
    a, b = list(range(2, 34)), list(range(2, 18)) + list(range(50, 66))
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert len(ha) == 2 and len(block_hashes(a[:31], 16)) == 1  # a partial block has no hash
    assert ha[0] == hb[0] == block_hash(ROOT_HASH, a[:16])
    assert ha[1] == block_hash(ha[0], a[16:32]) and ha[1] != hb[1]
    # the same block after another parent is another block
    assert block_hash(ROOT_HASH, a[16:32]) != ha[1]


def test_match_reuses_full_blocks_and_always_leaves_the_last_token() -> None:
    model = seeded_model()
    model.setup_caches(2, 128)
    cache = PrefixCache(model, capacity=8, block_size=4)
    prompt = ids(12, seed=3)
    assert cache.match(prompt).tokens == 0
    assert cache.store(model, prompt, row=0) == 3  # 12 tokens: 3 full blocks
    hit = cache.match(prompt)
    assert hit.tokens == 8, "12 tokens: the third block holds the last token, which is always computed"
    cache.release(hit)
    longer = cache.match([*prompt, 5])
    assert longer.tokens == 12
    cache.release(longer)
    other = cache.match([*prompt[:4], 7, 7, 7, 7, *prompt[8:], 5])
    assert other.tokens == 4, "a different second block ends the match there"
    cache.release(other)
    assert cache.stats.blocks_used == 3 and cache.stats.blocks_referenced == 0


def test_load_copies_the_stored_keys_exactly() -> None:
    model = seeded_model()
    model.setup_caches(2, 128)
    caches = model.kv_caches()
    with torch.no_grad():
        for c in caches:
            c.k[0].normal_()
            c.v[0].normal_()
    cache = PrefixCache(model, capacity=4, block_size=4)
    prompt = ids(9, seed=4)
    cache.store(model, prompt, row=0)
    hit = cache.match(prompt)
    cache.load(model, hit, row=1)
    for c in caches:
        assert torch.equal(c.k[1, :, :8], c.k[0, :, :8]) and torch.equal(c.v[1, :, :8], c.v[0, :, :8])
        assert not torch.equal(c.k[1, :, 8], c.k[0, :, 8])
    cache.release(hit)


def test_referenced_blocks_survive_and_lru_evicts_under_the_budget() -> None:
    model = seeded_model()
    model.setup_caches(1, 128)
    cache = PrefixCache(model, capacity=4, block_size=4)
    a, b, c = ids(9, seed=5), ids(9, seed=6), ids(9, seed=7)
    cache.store(model, a, 0)
    cache.store(model, b, 0)  # the pool is full: 2 blocks each
    held = cache.match(a)  # a's blocks are referenced
    assert held.tokens == 8
    assert (cache.stats.blocks_used, cache.stats.blocks_referenced) == (4, 2)
    assert cache.store(model, c, 0) == 2, "c evicts b's blocks, the only unreferenced ones"
    assert cache.stats.evictions == 2
    probe = cache.match(b)
    assert probe.tokens == 0
    cache.release(probe)
    assert cache.store(model, ids(9, seed=8), 0) == 2  # now c's blocks go: a's are still held
    cache.release(held)
    hit = cache.match(a)
    assert hit.tokens == 8, "a referenced block is never evicted"
    cache.release(hit)
    # everything referenced: nothing can be added
    h1, h2 = cache.match(a), cache.match(ids(9, seed=8))
    assert h1.tokens == h2.tokens == 8
    assert cache.store(model, b, 0) == 0
    assert cache.stats.blocks_referenced == 4
    cache.release(h1)
    cache.release(h2)
    assert (cache.stats.blocks_used, cache.stats.blocks_referenced, cache.stats.evictions) == (4, 0, 4)
    with pytest.raises(AssertionError, match="released more often"):
        cache.release(type(h1)([0], 4))


def test_lru_prefers_the_least_recently_used_and_a_chain_tail_first() -> None:
    model = seeded_model()
    model.setup_caches(1, 128)
    cache = PrefixCache(model, capacity=4, block_size=4)
    old, new = ids(9, seed=9), ids(9, seed=10)
    cache.store(model, old, 0)
    cache.store(model, new, 0)
    cache.release(cache.match(old))  # old was used last: new is now the least recently used
    cache.store(model, ids(5, seed=11), 0)  # one block needed: new's tail goes
    m_new, m_old = cache.match(new), cache.match(old)
    assert (m_new.tokens, m_old.tokens) == (4, 8)


def test_changes_name_every_block_gained_and_lost_for_the_routers() -> None:
    """What the model reports to the routers (precise cache-aware routing): exactly the blocks held."""
    model = seeded_model()
    model.setup_caches(1, 128)
    cache = PrefixCache(model, capacity=4, block_size=4)
    a, b, c = ids(9, seed=20), ids(9, seed=21), ids(9, seed=22)
    assert cache.take_changes() == ([], [])
    cache.store(model, a, 0)
    cache.store(model, b, 0)
    stored, removed = cache.take_changes()
    assert sorted(stored) == sorted(block_hashes(a, 4) + block_hashes(b, 4)) and removed == []
    cache.release(cache.match(b))  # b used last: a's blocks go first
    cache.store(model, c, 0)
    stored, removed = cache.take_changes()
    assert sorted(stored) == sorted(block_hashes(c, 4)) and sorted(removed) == sorted(block_hashes(a, 4))
    assert sorted(cache.held()) == sorted(block_hashes(b, 4) + block_hashes(c, 4))
    cache.store(model, a, 0)  # a back, c evicted (b's were used more recently), then b evicted for d
    cache.store(model, ids(9, seed=23), 0)
    stored, removed = cache.take_changes()
    assert not set(stored) & set(removed), "each block's last change only"
    assert set(cache.held()) == set(stored) | (set(block_hashes(b, 4) + block_hashes(c, 4)) - set(removed))


# ---------------------------------------------------------------- the scheduler with a prefix cache


def test_greedy_tokens_identical_with_and_without_the_cache_on_a_seeded_llama() -> None:
    model = seeded_model(seed=1)
    system = ids(40, seed=20)
    prompts = [system + ids(3 + i, seed=30 + i) for i in range(6)] + [ids(20, seed=50), [*system[:16], 3]]
    reqs = [SequenceRequest(i, p, 12, stop_ids=EOS) for i, p in enumerate(prompts)]
    ref_tokens, ref_finish = run(BatchScheduler(model, max_sequences=4, max_context=128),
                                 {i: [r] for i, r in enumerate(reqs)})
    # one at a time: the first prompt fills the cache, the others hit its blocks
    cached = BatchScheduler(model, max_sequences=4, max_context=128, prefix_cache_blocks=16, prefix_block_size=8)
    tokens, finish = run(cached, {i * 20: [r] for i, r in enumerate(reqs)})
    assert tokens == ref_tokens
    expected = {0: 0, 1: 40, 2: 40, 3: 40, 4: 40, 5: 40, 6: 0, 7: 16}
    assert {i: finish[i].cached_tokens for i in expected} == expected
    for i in expected:
        assert finish[i].completion_tokens == ref_finish[i].completion_tokens
        assert finish[i].prompt_tokens == ref_finish[i].prompt_tokens and ref_finish[i].cached_tokens == 0


def test_a_batched_prefill_mixes_hits_and_misses() -> None:
    model = seeded_model(seed=2)
    system = ids(33, seed=21)
    warm = SequenceRequest("warm", [*system, 5], 4, stop_ids=EOS)
    mixed = [SequenceRequest(i, p, 10, stop_ids=EOS) for i, p in enumerate([
        system + ids(9, seed=40),  # hit: 32 tokens
        ids(30, seed=41),  # miss, longer rest than the hit's
        system[:20] + ids(2, seed=42),  # hit: 16 tokens
        [7],  # a one-token prompt
        system + ids(9, seed=40),  # the first prompt again (n choices): prefilled once, same cached count
    ])]
    ref_tokens, _ = run(BatchScheduler(model, max_sequences=6, max_context=128), {0: mixed})
    cached = BatchScheduler(model, max_sequences=6, max_context=128, prefix_cache_blocks=16, prefix_block_size=16)
    run(cached, {0: [warm]})
    tokens, finish = run(cached, {0: mixed})
    assert tokens == ref_tokens
    assert [finish[i].cached_tokens for i in range(5)] == [32, 0, 16, 0, 32]
    assert cached.prefills_shared == 1


def test_rows_of_very_different_lengths_are_prefilled_in_groups_with_the_same_tokens() -> None:
    assert _length_groups([300, 20, 310, 5, 40, 33]) == [[3, 1], [5, 4], [0, 2]]  # <= 32 share; then up to 2x
    assert _length_groups([]) == []
    model = seeded_model(seed=3)
    system = ids(96, seed=50)
    warm = SequenceRequest("warm", [*system, 5], 4, stop_ids=EOS)
    mixed = [SequenceRequest(i, p, 8, stop_ids=EOS) for i, p in enumerate([
        system + ids(4, seed=51),  # a hit: 4 tokens left to compute
        ids(100, seed=52),  # a miss of 100: a forward of its own
        system + ids(3, seed=53),  # another hit, grouped with the first
    ])]
    ref_tokens, _ = run(BatchScheduler(model, max_sequences=4, max_context=128), {0: mixed})
    cached = BatchScheduler(model, max_sequences=4, max_context=128, prefix_cache_blocks=16, prefix_block_size=16)
    run(cached, {0: [warm]})
    calls: list[int] = []
    for name in ("prefill_slots", "prefill_slots_at"):
        original = getattr(model, name)

        def counted(idx: torch.Tensor, *args: torch.Tensor, _original=original) -> torch.Tensor:  # type: ignore[no-untyped-def]
            calls.append(idx.shape[0] * idx.shape[1])  # rows x padded length: the tokens computed
            return _original(idx, *args)

        setattr(model, name, counted)
    tokens, finish = run(cached, {0: mixed})
    assert tokens == ref_tokens
    assert [finish[i].cached_tokens for i in range(3)] == [96, 0, 96]
    assert sorted(calls[:2]) == [2 * 4, 100], "two forwards: the hits' 4 tokens each, the miss's 100 alone"


def test_shipped_tiny_llama_same_text_with_a_warm_cache() -> None:
    model = load_model(TINY_LLAMA, progress=None)
    tok = Tokenizer.from_file(str(TINY_LLAMA / "tokenizer.json"))
    system = tok.encode("You are a helpful assistant that explains the Python standard library. " * 4).ids
    questions = ["What does os.path.join do?", "Return the number of", "If the value is not None,"]
    reqs = [SequenceRequest(i, system + tok.encode(q).ids, 24, stop_ids=EOS) for i, q in enumerate(questions)]
    ref_tokens, _ = run(BatchScheduler(model, max_sequences=4, max_context=512), {0: reqs})
    cached = BatchScheduler(model, max_sequences=4, max_context=512, prefix_cache_blocks=64)
    run(cached, {0: [SequenceRequest("warm", system, 1)]})
    tokens, finish = run(cached, {0: reqs})
    assert tokens == ref_tokens
    reused = len(system) // 16 * 16
    assert reused > 0 and all(f.cached_tokens == reused for f in finish.values())
    assert cached.stats.prefix_blocks_used > 0 and cached.stats.prefix_blocks_total == 64


def test_a_store_never_evicts_its_own_chain_and_a_hash_collision_reuses_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = seeded_model()
    model.setup_caches(1, 128)
    cache = PrefixCache(model, capacity=3, block_size=4)
    base = ids(8, seed=12)
    cache.store(model, base, 0)  # 2 blocks
    cache.store(model, ids(5, seed=13), 0)  # 1 block: the pool is full, base's blocks are the least recent
    # base + 2 more blocks: one slot is free only by eviction; base's own blocks are held, so the other prompt's goes
    assert cache.store(model, base + ids(8, seed=14), 0) == 1
    hit = cache.match([*base, *ids(8, seed=14), 3])
    assert hit.tokens == 12, "the chain base -> its third block survives"
    cache.release(hit)

    import inferplane.modeling.llama.prefix_cache as prefix_cache

    monkeypatch.setattr(prefix_cache, "block_hash", lambda parent, tokens: 7)  # every block collides
    colliding = PrefixCache(model, capacity=4, block_size=4)
    a, b = ids(9, seed=15), ids(9, seed=16)
    assert colliding.store(model, a, 0) == 1, "the second block's hash is taken by the first: nothing deeper"
    miss = colliding.match(b)
    assert miss.tokens == 0, "same hash, other tokens: not a hit"
    assert colliding.store(model, b, 0) == 0
    assert colliding.match(a).tokens == 4
