"""Metering's database holds no plaintext key, on SQLite and on PostgreSQL: a dump of every table, every row.

Keys are made every way there is (the store, gRPC ``CreateKey``, with a budget), then used (verified, billed,
reserved, one revoked) so that every table has rows. The dump is ``SELECT *`` of every table the database has
(found by inspection, so a new table is dumped too); no key, no secret part of a key (``sk-ip-<id>-<secret>``)
and not the HMAC secret may be in it. The key ids and a key's name are: the dump reads the real rows.
"""

from __future__ import annotations

import uuid

from sqlalchemy import MetaData, inspect, select

from inferplane.metering.store import KEY_ID_LENGTH, KEY_PREFIX
from inferplane.v1 import metering_pb2, metering_pb2_grpc
from tests.integration.test_admission import (  # noqa: F401  (fixtures)
    MODEL,
    SECRET,
    Metering,
    database_url,
    metering,
    record,
)


def secret_of(plain: str) -> str:
    assert plain.startswith(KEY_PREFIX) and plain[len(KEY_PREFIX) + KEY_ID_LENGTH] == "-"
    return plain[len(KEY_PREFIX) + KEY_ID_LENGTH + 1:]


def _render(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return f"{raw.decode('latin-1')} {raw.hex()}"  # as text, and as a dump writes a BLOB
    return str(value)


def dump_database(m: Metering) -> tuple[str, dict[str, int]]:
    """Every row of every table in the database (not only those the models name), as text; rows per table."""
    tables = inspect(m.store.engine).get_table_names()
    meta = MetaData()
    meta.reflect(m.store.engine, only=tables)
    lines: list[str] = []
    counts: dict[str, int] = {}
    with m.store.engine.connect() as conn:
        for name in tables:
            rows = conn.execute(select(meta.tables[name])).all()
            counts[name] = len(rows)
            lines += [f"{name}: " + " | ".join(_render(v) for v in row) for row in rows]
    return "\n".join(lines), counts


async def test_no_plaintext_key_in_any_table(metering: Metering) -> None:  # noqa: F811
    s = metering_pb2_grpc.MeteringServiceStub(metering.channel)
    marker = f"key-storage-{uuid.uuid4().hex[:8]}"
    admin_info, admin = metering.store.create_key(marker, scopes=["admin"])
    _, plain = metering.store.create_key("plain", tenant_id="t1", models=[MODEL.id])
    made = await s.CreateKey(metering_pb2.CreateKeyRequest(
        name="over-grpc", tenant_id="t2", budget=metering_pb2.Budget(
            limit_nanodollars=10**10, period=metering_pb2.BUDGET_PERIOD_MONTHLY)),
        metadata=(("authorization", f"Bearer {admin}"),), timeout=5)
    revoked_info, revoked = metering.store.create_key("revoked")
    keys = {"admin": admin, "plain": plain, "grpc": made.api_key, "revoked": revoked}

    for name in ("plain", "grpc"):
        key = await metering.client.verify_key(keys[name], timeout=5)
        await metering.client.record_usage_batch([record(f"{name}-{i}", key, 10, 5) for i in range(2)])
        await s.Reserve(metering_pb2.ReserveRequest(reservation_id=f"res-{name}", key_id=key.key_id, model=MODEL.id,
                                                    prompt_tokens=10, max_tokens=10), timeout=5)
    await s.WhoAmI(metering_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {admin}"),), timeout=5)
    metering.store.revoke_key(revoked_info.key_id)

    dump, counts = dump_database(metering)
    assert {"api_keys", "usage_records", "prices", "budgets", "reservations"} <= set(counts)
    assert counts["api_keys"] == 4 and counts["usage_records"] == 4
    assert counts["reservations"] >= 1  # the budgeted key's (a key without a budget reserves nothing)
    assert marker in dump and all(plain_key[len(KEY_PREFIX):][:KEY_ID_LENGTH] in dump for plain_key in keys.values())
    assert admin_info.key_id in dump
    for name, plain_key in keys.items():
        secret = secret_of(plain_key)
        for part, value in (("key", plain_key), ("secret", secret), ("secret head", secret[:16]),
                            ("secret tail", secret[-16:]), ("key as hex", plain_key.encode().hex())):
            assert value not in dump, f"the {name} key's {part} is in the {metering.store.engine.dialect.name} dump"
    assert SECRET.decode() not in dump and SECRET.hex() not in dump  # the HMAC secret lives in its file only


def test_the_dump_would_show_a_stored_key(metering: Metering) -> None:  # noqa: F811
    """The dump can fail: a key written into a column (here a key's name) is in it, in full."""
    _, plain = metering.store.create_key("victim")
    metering.store.create_key(plain[:200])  # a name is at most 200 characters; a key is 62
    dump, _ = dump_database(metering)
    assert plain in dump and secret_of(plain) in dump
