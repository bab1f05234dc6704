"""Cache-aware routing (issue 16 item 2): the router's prefix index (which blocks each replica probably holds, LRU
under the model's cache budget, as the model's pool ages them) and the scoring (longest leading match, then load;
power of two choices when the match is poor or the best replica is overloaded); the hash is the model's own."""

from __future__ import annotations

import gc
import random
import tracemalloc

import pytest

from inferplane.modeling.blocks import block_hashes
from inferplane.modeling.llama import prefix_cache
from inferplane.router.prefix_index import Prefix, PrefixIndex, choose_cached
from inferplane.router.replicas import ReplicaSet
from inferplane.router.settings import RouterSettings
from tests.unit.test_replicas import Starts, replica


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32_000) for _ in range(n)]


def prefix(token_ids: list[int], capacity: int = 64) -> Prefix:
    return Prefix.of(token_ids, block_size=16, capacity=capacity)


def test_the_router_hashes_blocks_with_the_models_own_function() -> None:
    assert prefix_cache.block_hashes is block_hashes  # one definition, imported by both
    ids = tokens(50, seed=1)
    assert prefix(ids).hashes == tuple(prefix_cache.block_hashes(ids, 16))  # 3 full blocks; the partial one has none
    assert len(prefix(ids, capacity=2).hashes) == 2  # never more than the budget


def test_matched_counts_the_leading_run_of_held_blocks() -> None:
    index = PrefixIndex()
    system = tokens(64, seed=2)
    index.record("m", "a", prefix(system + tokens(20, seed=3)))  # 5 blocks: 4 of the system prompt, 1 of the user's
    other_user = prefix(system + tokens(20, seed=4))
    assert index.matched("m", "a", other_user.hashes) == 4  # the shared system prompt, not the other user's block
    assert index.matched("m", "b", other_user.hashes) == 0  # per replica
    assert index.matched("other-model", "a", other_user.hashes) == 0  # per model
    changed_start = prefix(tokens(16, seed=5) + system[16:])
    assert index.matched("m", "a", changed_start.hashes) == 0, "a chained hash names the whole prefix"


def test_the_index_is_bounded_by_the_cache_budget_and_ages_chains_tail_first() -> None:
    index = PrefixIndex()
    old, new = tokens(64, seed=6), tokens(64, seed=7)
    index.record("m", "a", prefix(old, capacity=6))  # 4 blocks
    index.record("m", "a", prefix(new, capacity=6))  # 4 more: 2 of old's go, its deepest first
    assert len(index) == 6
    assert index.matched("m", "a", prefix(old).hashes) == 2, "old's head survives, its tail went"
    assert index.matched("m", "a", prefix(new).hashes) == 4
    index.record("m", "a", prefix(old, capacity=6))  # used again: most recent; new's tail goes
    assert index.matched("m", "a", prefix(old).hashes) == 4
    assert index.matched("m", "a", prefix(new).hashes) == 2
    index.forget("a")  # the replica restarted or left: its cache is empty
    assert len(index) == 0 and index.matched("m", "a", prefix(old).hashes) == 0


def test_the_index_memory_per_block_is_bounded() -> None:
    """What docs/router.md states: about 160 bytes a 16-token block (CPython 3.11), nothing beyond the budget."""
    index = PrefixIndex()
    capacity = 5_000
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    rng = random.Random(0)
    for _ in range(250):  # 250 prompts of 40 blocks: twice the budget
        index.record("m", "a", Prefix(tuple(rng.getrandbits(64) for _ in range(40)), capacity))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(index) == capacity
    per_block = used / capacity
    print(f"prefix index: {per_block:.0f} bytes a block")
    assert per_block < 200


def test_scoring_prefers_the_longest_match_then_the_lighter_load() -> None:
    index, rng = PrefixIndex(), random.Random(0)
    a, b, c = replica("a", outstanding=2), replica("b"), replica("c")
    system = tokens(160, seed=8)  # 10 blocks
    index.record("m", "a", prefix(system))
    index.record("m", "b", prefix(system[:64]))  # only the first 4
    request = prefix(system + tokens(10, seed=9))
    for _ in range(20):
        assert choose_cached([a, b, c], "m", request, index, rng, max_imbalance=4, min_match=0.1) == (a, "cached")
    index.record("m", "c", prefix(system))  # c holds as much as a, with less load: c
    assert choose_cached([a, b, c], "m", request, index, rng, max_imbalance=4, min_match=0.1) == (c, "cached")


def test_scoring_falls_back_to_power_of_two_when_imbalanced_or_the_match_is_poor() -> None:
    index, rng = PrefixIndex(), random.Random(0)
    busy, idle = replica("busy", outstanding=5), replica("idle")
    system = tokens(160, seed=10)
    index.record("m", "busy", prefix(system))
    request = prefix(system)
    got, why = choose_cached([busy, idle], "m", request, index, rng, max_imbalance=4, min_match=0.1)
    assert (got, why) == (idle, "imbalanced")  # 5 above the least loaded > 4: power of two picks the idle one
    busy.outstanding = 4  # exactly max_imbalance above: still the cached one
    assert choose_cached([busy, idle], "m", request, index, rng, max_imbalance=4, min_match=0.1) == (busy, "cached")
    # a poor match: 1 block of 10 held, fewer than min_match 0.5 of them
    index2 = PrefixIndex()
    index2.record("m", "busy", prefix(system[:16]))
    got, why = choose_cached([busy, idle], "m", request, index2, rng, max_imbalance=4, min_match=0.5)
    assert (got, why) == (idle, "poor_match")
    got, why = choose_cached([busy, idle], "m", prefix(tokens(160, seed=11)), index, rng, max_imbalance=4,
                             min_match=0.1)
    assert (got, why) == (idle, "poor_match")  # nothing held anywhere: by load


def replica_set(*names: str, policy: str = "cache_aware") -> ReplicaSet:
    rs = ReplicaSet(list(names), channel_factory=lambda a: None, seed=0,  # type: ignore[arg-type,return-value]
                    policy=policy)  # type: ignore[arg-type]
    for name in names:
        rs.replicas[name] = replica(name)
        rs.replicas[name].models = {"m"}
        rs.replicas[name].reported = True
    return rs


async def test_requests_follow_their_prompts_prefixes_to_the_replica_that_took_them_first() -> None:
    """Through ``ReplicaSet.open``: the replica a prompt went to is recorded; later prompts with the same system
    prompt go there, 16 system prompts spread over both replicas by load, and a restarted replica is forgotten."""
    rs = replica_set("a", "b")
    systems = [tokens(160, seed=100 + i) for i in range(16)]
    home: dict[int, str] = {}
    for user in range(4):
        for i, system in enumerate(systems):
            p = rs.prefix(system + tokens(20, seed=1000 * user + i), block_size=16, capacity=400)
            async with rs.open("m", Starts(fail=set()), prefix=p) as got:
                if user == 0:
                    home[i] = got
                    rs.replicas[got].reported_active += 1  # the executor's queue: the next system prompt goes by load
                else:
                    assert got == home[i], f"system prompt {i}, user {user}: went to {got}, its blocks are on {home[i]}"
    assert set(home.values()) == {"a", "b"}
    rs.index.forget("a")  # as on a restart (health back to SERVING)
    moved = [i for i, system in enumerate(systems) if home[i] == "a"]
    p = rs.prefix(systems[moved[0]], block_size=16, capacity=400)
    assert rs.index.matched("m", "a", p.hashes if p else ()) == 0


@pytest.mark.parametrize("policy", ["p2c", "random"])
def test_other_policies_do_not_hash_prompts(policy: str) -> None:
    rs = replica_set("a", "b", policy=policy)
    assert rs.prefix(tokens(64, seed=1), block_size=16, capacity=100) is None
    assert {rs.pick("m").address for _ in range(40)} == {"a", "b"}
    assert replica_set("a").prefix(tokens(64, seed=1), block_size=16, capacity=0) is None  # no cache: by load


def test_the_policy_is_a_router_setting() -> None:
    assert RouterSettings().routing_policy == "cache_aware"
    assert RouterSettings(routing_policy="random").routing_policy == "random"
    with pytest.raises(ValueError):
        RouterSettings(routing_policy="round_robin")  # type: ignore[arg-type]


# --- precise: the replicas report their blocks ------------------------------------------------------------


def test_reports_replace_guesses_and_follow_evictions_exactly() -> None:
    index = PrefixIndex()
    system = tokens(64, seed=20)
    p = prefix(system)  # 4 blocks
    index.record("m", "a", p)  # a guess
    assert not index.is_precise("m", "a") and index.matched("m", "a", p.hashes) == 4
    index.apply("m", "a", True, [], [])  # the replica's snapshot: its cache is empty (a restart the router missed)
    assert index.is_precise("m", "a") and index.matched("m", "a", p.hashes) == 0
    index.record("m", "a", p)  # guesses no longer count where the replica reports
    assert index.matched("m", "a", p.hashes) == 0
    index.apply("m", "a", False, list(p.hashes), [])
    assert index.matched("m", "a", p.hashes) == 4
    index.apply("m", "a", False, [], [p.hashes[2]])  # evicted (for another router's request, say)
    assert index.matched("m", "a", p.hashes) == 2  # the chain stops at the hole
    assert index.matched("m", "b", p.hashes) == 0 and index.matched("n", "a", p.hashes) == 0  # per replica, model
    index.apply("m", "a", True, list(p.hashes[:1]), [])  # a snapshot replaces everything
    assert index.matched("m", "a", p.hashes) == 1 and index.precise_blocks() == 1


def test_a_lost_channel_goes_back_to_guessing_and_forget_drops_both() -> None:
    index = PrefixIndex()
    p = prefix(tokens(64, seed=21))
    index.apply("m", "a", True, list(p.hashes), [])
    index.record("m", "b", p)
    index.forget_guesses("a")  # a health flap: the reports stay (the channel did not break)
    assert index.matched("m", "a", p.hashes) == 4
    index.lost("a")
    assert not index.is_precise("m", "a") and index.matched("m", "a", p.hashes) == 0
    index.record("m", "a", p)  # guessing again
    assert index.matched("m", "a", p.hashes) == 4
    index.apply("m", "b", True, list(p.hashes), [])
    index.forget("b")
    assert len(index) == 4 and index.matched("m", "b", p.hashes) == 0


def test_the_precise_index_is_bounded_even_against_a_faulty_report() -> None:
    index = PrefixIndex(max_precise=10)
    index.apply("m", "a", True, list(range(8)), [])
    index.apply("m", "a", False, list(range(100, 120)), [])
    assert index.precise_blocks() == 10


def test_the_precise_index_memory_per_block() -> None:
    """What docs/router.md states: about 105 bytes a reported block (one int in a set, the set's spare room
    included; CPython 3.11)."""
    index = PrefixIndex()
    rng = random.Random(1)
    hashes = [rng.getrandbits(64) for _ in range(20_000)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for at in range(0, len(hashes), 100):  # as changes arrive, 100 at a time
        index.apply("m", "a", at == 0, hashes[at:at + 100], [])
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert index.precise_blocks() == len(hashes)
    per_block = used / len(hashes)
    print(f"precise prefix index: {per_block:.0f} bytes a block")
    assert per_block < 130


async def test_reported_blocks_steer_requests_to_the_replica_that_holds_them() -> None:
    """Through ``ReplicaSet.open``: the replica that reports a prompt's blocks gets it, even though this router
    sent that prompt elsewhere before (another router's traffic filled b's cache; a's was evicted)."""
    rs = replica_set("a", "b")
    system = tokens(160, seed=30)
    p = rs.prefix(system + tokens(20, seed=31), block_size=16, capacity=400)
    assert p is not None
    rs.index.apply("m", "a", True, [], [])
    rs.index.apply("m", "b", True, list(p.hashes[:10]), [])
    for _ in range(10):
        async with rs.open("m", Starts(fail=set()), prefix=p) as got:
            assert got == "b"
    rs.index.apply("m", "b", False, [], list(p.hashes))  # b evicted it; a reports it now
    rs.index.apply("m", "a", False, list(p.hashes[:10]), [])
    async with rs.open("m", Starts(fail=set()), prefix=p) as got:
        assert got == "a"
