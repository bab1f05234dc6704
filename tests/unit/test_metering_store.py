"""The metering store on a real SQLite file: keys kept hashed, verification, an idempotent ledger."""

from __future__ import annotations

import stat
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from inferplane.common.errors import InvalidArgument, NotFound, Unauthenticated
from inferplane.metering.secret import load_secret
from inferplane.metering.store import BAD_KEY_MESSAGE, KEY_ID_LENGTH, MeteringStore, UsageRow

SECRET = b"unit-test-secret-0123456789abcdef"
T0 = datetime(2025, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "metering.db"  # the parent folder does not exist yet


@pytest.fixture
def store(db_path: Path) -> Iterator[MeteringStore]:
    s = MeteringStore(f"sqlite:///{db_path}", SECRET)
    s.create_tables()
    yield s
    s.close()


def usage(request_id: str, *, key_id: str = "k" * 12, at: datetime = T0, **kw: object) -> UsageRow:
    fields: dict[str, object] = dict(request_id=request_id, key_id=key_id, model="tiny-llama", prompt_tokens=7,
                                     completion_tokens=5, finish_reason="stop", latency_ms=42, created_at=at)
    fields.update(kw)
    return UsageRow(**fields)  # type: ignore[arg-type]


# ---- keys ----------------------------------------------------------------------------------------


def test_key_format_and_only_the_digest_is_stored(store: MeteringStore, db_path: Path) -> None:
    info, plain = store.create_key("ci")
    assert plain.startswith(f"sk-ip-{info.key_id}-")
    assert len(info.key_id) == KEY_ID_LENGTH and info.key_id.isalnum()
    assert len(plain.removeprefix(f"sk-ip-{info.key_id}-")) == 43  # token_urlsafe(32)
    assert info.name == "ci" and info.revoked_at is None and info.created_at.tzinfo is not None
    store.close()  # flush the WAL into the main file, then look at every byte on disk
    raw = b"".join(p.read_bytes() for p in db_path.parent.iterdir())
    secret_part = plain.removeprefix(f"sk-ip-{info.key_id}-").encode()  # the whole secret (it may hold "-")
    assert plain.encode() not in raw and secret_part not in raw
    assert info.key_id.encode() in raw  # the id is public and is stored


def test_verify_ok(store: MeteringStore) -> None:
    info, plain = store.create_key("ci")
    assert store.verify_key(plain) == info


@pytest.mark.parametrize("mangle", [
    lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),  # wrong secret part
    lambda k: k.replace("sk-ip-", "sk-xx-"),           # wrong prefix
    lambda k: k[:-10],                                 # truncated but well formed
    lambda k: "sk-ip-" + "Z" * 12 + k[18:],            # unknown key id
    lambda k: "",
    lambda k: "sk-ip-",
    lambda k: "not a key",
    lambda k: k + " ",
    lambda k: k.upper(),
])
def test_verify_refuses_bad_keys_without_echoing_them(store: MeteringStore, mangle: Callable[[str], str]) -> None:
    _, plain = store.create_key("ci")
    bad = mangle(plain)
    with pytest.raises(Unauthenticated) as err:
        store.verify_key(bad)
    assert err.value.message == BAD_KEY_MESSAGE
    assert plain[6:18] not in str(err.value) and (not bad or bad not in str(err.value))


def test_a_key_hashed_with_another_secret_does_not_verify(store: MeteringStore, db_path: Path) -> None:
    _, plain = store.create_key("ci")
    other = MeteringStore(f"sqlite:///{db_path}", b"another-secret")
    with pytest.raises(Unauthenticated):
        other.verify_key(plain)
    other.close()


def test_revoke(store: MeteringStore) -> None:
    info, plain = store.create_key("ci")
    other, other_plain = store.create_key("other")
    revoked = store.revoke_key(info.key_id)
    assert revoked.revoked and revoked.key_id == info.key_id
    with pytest.raises(Unauthenticated) as err:
        store.verify_key(plain)
    assert err.value.message == BAD_KEY_MESSAGE
    assert store.verify_key(other_plain) == other
    assert store.revoke_key(info.key_id).revoked_at == revoked.revoked_at  # idempotent: first time kept
    with pytest.raises(NotFound):
        store.revoke_key("nosuchkey000")


def test_list_keys(store: MeteringStore) -> None:
    a, _ = store.create_key("a")
    b, _ = store.create_key("b")
    store.revoke_key(a.key_id)
    keys = {k.key_id: k for k in store.list_keys()}
    assert set(keys) == {a.key_id, b.key_id}
    assert keys[a.key_id].revoked and not keys[b.key_id].revoked


def test_create_key_needs_a_name(store: MeteringStore) -> None:
    with pytest.raises(InvalidArgument):
        store.create_key("  ")


def test_sqlite_uses_wal(store: MeteringStore) -> None:
    assert store.sqlite_journal_mode() == "wal"


# ---- usage ---------------------------------------------------------------------------------------


def test_same_request_id_twice_is_one_record_and_the_first_wins(store: MeteringStore) -> None:
    assert store.record_usage(usage("req-1", prompt_tokens=7)) is True
    assert store.record_usage(usage("req-1", prompt_tokens=999)) is False
    assert store.count_usage() == 1
    [row] = store.list_usage()
    assert row.prompt_tokens == 7 and row.recorded_at is not None


def test_concurrent_record_of_one_request_id_stores_exactly_one(store: MeteringStore, db_path: Path) -> None:
    # Two stores on one file (as the service and the CLI), eight threads, one request id.
    second = MeteringStore(f"sqlite:///{db_path}", SECRET)
    n = 8
    barrier = threading.Barrier(n)
    results: list[bool] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        target = store if i % 2 else second
        barrier.wait(timeout=10)
        try:
            results.append(target.record_usage(usage("req-race", completion_tokens=i)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    second.close()
    assert not errors
    assert sorted(results) == [False] * (n - 1) + [True]
    assert store.count_usage() == 1


def test_list_usage_newest_first_filter_and_limit(store: MeteringStore) -> None:
    for i in range(5):
        store.record_usage(usage(f"a-{i}", key_id="keyAAAAAAAAA", at=T0 + timedelta(seconds=i)))
    store.record_usage(usage("b-0", key_id="keyBBBBBBBBB", at=T0 + timedelta(seconds=10)))
    assert [r.request_id for r in store.list_usage()] == ["b-0", "a-4", "a-3", "a-2", "a-1", "a-0"]
    assert [r.request_id for r in store.list_usage(limit=2)] == ["b-0", "a-4"]
    assert [r.request_id for r in store.list_usage(key_id="keyAAAAAAAAA", limit=3)] == ["a-4", "a-3", "a-2"]
    assert store.count_usage() == 6 and store.count_usage("keyBBBBBBBBB") == 1
    assert store.list_usage()[0].created_at == T0 + timedelta(seconds=10)  # aware UTC round trip
    for bad in (0, -1, 1001):
        with pytest.raises(InvalidArgument):
            store.list_usage(limit=bad)


def test_usage_round_trip_keeps_optional_ttft(store: MeteringStore) -> None:
    store.record_usage(usage("with", time_to_first_token_ms=12))
    store.record_usage(usage("without", at=T0 - timedelta(seconds=1)))
    with_ttft, without = store.list_usage()
    assert with_ttft.time_to_first_token_ms == 12 and without.time_to_first_token_ms is None


@pytest.mark.parametrize("kw", [
    {"request_id": ""}, {"key_id": ""}, {"model": ""}, {"finish_reason": ""}, {"prompt_tokens": -1},
    {"completion_tokens": -1}, {"latency_ms": -1}, {"time_to_first_token_ms": -1},
    {"created_at": datetime(2025, 1, 1)}, {"request_id": "x" * 129},
])
def test_usage_row_validation(kw: dict[str, object]) -> None:
    fields: dict[str, object] = {"request_id": "r", **kw}
    with pytest.raises(InvalidArgument):
        usage(**fields)  # type: ignore[arg-type]


def test_memory_database_is_shared_across_threads() -> None:
    s = MeteringStore("sqlite://", SECRET)
    s.create_tables()
    t = threading.Thread(target=s.record_usage, args=(usage("m-1"),))
    t.start()
    t.join()
    assert s.count_usage() == 1
    s.close()


# ---- secret --------------------------------------------------------------------------------------


def test_secret_value_wins(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    assert load_secret(secret=SecretStr("abc"), secret_file=path) == b"abc"
    assert not path.exists()


def test_secret_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "secret"
    first = load_secret(secret=None, secret_file=path)
    assert len(first) == 64 and bytes.fromhex(first.decode())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(secret=None, secret_file=path) == first
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temporary file left behind
