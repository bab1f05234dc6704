"""Session affinity in the replica set: a session keeps to its replica, per model; it moves when that replica is
gone, ejected, retiring or overloaded (and stays on the new one); pins expire after their idle time and the table is
a bounded LRU; a request without a session is picked by power of two choices as before."""

from __future__ import annotations

import time

import grpc
import pytest
from starlette.datastructures import Headers

from inferplane.gateway.errors import GatewayError
from inferplane.gateway.generation import session_id
from inferplane.router.replicas import Affinity, ReplicaSet
from tests.unit.test_replicas import Starts, replica


def replica_set(*names: str, affinity: Affinity | None = None) -> ReplicaSet:
    rs = ReplicaSet(list(names), channel_factory=lambda a: None, seed=0,  # type: ignore[arg-type,return-value]
                    affinity=affinity)
    for name in names:
        rs.replicas[name] = replica(name)
        rs.replicas[name].models = {"m", "other"}
        rs.replicas[name].reported = True
    return rs


def test_a_session_keeps_to_its_replica_while_others_are_picked_by_load() -> None:
    rs = replica_set("a", "b", "c", "d")
    first = rs.pick("m", session="s1")
    for _ in range(50):
        assert rs.pick("m", session="s1") is first
    # sessions spread like requests do: 40 sessions land on every replica
    assert {rs.pick("m", session=f"user-{i}").address for i in range(40)} == {"a", "b", "c", "d"}
    # per model: the same session id of another model is pinned on its own
    assert rs.pick("other", session="s1") in rs.replicas.values()
    assert len(rs.affinity) == 42


def test_a_session_moves_when_its_replica_is_gone_ejected_or_overloaded_and_stays_moved() -> None:
    rs = replica_set("a", "b", "c")
    home = rs.pick("m", session="s")
    home.ejected_until = time.monotonic() + 60  # ejected after a failure
    moved = rs.pick("m", session="s")
    assert moved is not home
    home.ejected_until = 0.0  # back: the session stays where it moved
    assert rs.pick("m", session="s") is moved
    # overloaded: more than max_imbalance (8) requests above the least-loaded replica
    moved.outstanding = 9
    assert rs.pick("m", session="s") is not moved
    now_home = rs.pick("m", session="s")
    # retiring (gone from discovery) or removed: moved again
    now_home.retiring = True
    assert rs.pick("m", session="s") is not now_home
    last = rs.pick("m", session="s")
    del rs.replicas[last.address]
    assert rs.pick("m", session="s").address in rs.replicas


def test_load_within_the_imbalance_keeps_the_session() -> None:
    rs = replica_set("a", "b")
    home = rs.pick("m", session="s")
    home.outstanding = 8  # exactly max_imbalance above the other (0)
    assert rs.pick("m", session="s") is home


def test_pins_expire_after_their_idle_time_and_the_table_is_a_bounded_lru() -> None:
    affinity = Affinity(max_sessions=3, idle_s=10.0)
    a, b = replica("a"), replica("b")
    affinity.pin("m", "old", a, now=100.0)
    assert affinity.pinned("m", "old", [a, b], now=109.0) is a
    affinity.pin("m", "old", a, now=109.0)  # used: its idle time starts again
    assert affinity.pinned("m", "old", [a, b], now=118.0) is a
    assert affinity.pinned("m", "old", [a, b], now=119.5) is None  # idle 10.5 s: expired
    assert len(affinity) == 0
    for i, now in enumerate((200.0, 201.0, 202.0, 203.0)):
        affinity.pin("m", f"s{i}", b, now=now)
    assert len(affinity) == 3  # bounded: the least recently used (s0) went
    assert affinity.pinned("m", "s0", [a, b], now=204.0) is None
    assert affinity.pinned("m", "s3", [a, b], now=204.0) is b


async def test_open_keeps_a_session_on_its_replica_and_a_retry_moves_it() -> None:
    rs = replica_set("a", "b")
    ok = Starts(set())
    for _ in range(5):
        async with rs.open("m", ok, session="s") as _:
            pass
    assert len({address for address, _ in ok.calls}) == 1
    home = ok.calls[0][0]
    failing = Starts({home}, grpc.StatusCode.UNAVAILABLE)  # its replica fails before the first token
    async with rs.open("m", failing, session="s") as opened:
        assert opened != home
    assert [address for address, _ in failing.calls] == [home, opened]
    again = Starts(set())
    async with rs.open("m", again, session="s") as _:
        pass
    assert again.calls[0][0] == opened  # pinned to where the retry went (its old replica is ejected anyway)


def test_requests_without_a_session_leave_no_pin() -> None:
    rs = replica_set("a", "b")
    picks = {rs.pick("m").address for _ in range(40)}
    assert picks == {"a", "b"} and len(rs.affinity) == 0


def test_the_rest_header_is_passed_on_or_refused_by_name() -> None:
    def headers(value: str | None) -> Headers:
        return Headers(raw=[] if value is None else [(b"x-session-id", value.encode())])

    assert session_id(headers(None)) == "" and session_id(headers("chat-42")) == "chat-42"
    with pytest.raises(GatewayError) as info:
        session_id(headers("x" * 257))
    assert (info.value.status, info.value.param) == (400, "x-session-id")
