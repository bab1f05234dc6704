"""Alembic migrations: head matches the models, a pre-migration database is adopted with its rows, downgrade works.

Runs on SQLite here and on PostgreSQL in ``tests/integration/test_postgres_store.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from inferplane.metering.db import alembic_config, current_revision, make_engine, migrate
from inferplane.metering.schema import Base
from inferplane.metering.store import MeteringStore

SECRET = b"migration-test-secret-0123456789"


HEAD = "0006"


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'metering.db'}"


def test_head_matches_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate(engine)
    assert current_revision(engine) == HEAD
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations differ: {diff}"


def test_migrate_twice_is_a_no_op(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate(engine)
    migrate(engine)
    assert current_revision(engine) == HEAD
    engine.dispose()


def test_a_database_from_before_migrations_is_adopted_with_its_rows(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate(engine, "0001")  # the first cut's schema ...
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))  # ... as ``create_all`` made it: no version table
        conn.execute(text("INSERT INTO api_keys (key_id, name, key_hash, created_at) "
                          "VALUES ('legacyKey001', 'old', 'ab', :t)"), {"t": datetime(2025, 12, 1)})
        conn.execute(text("INSERT INTO usage_records (request_id, key_id, model, prompt_tokens, completion_tokens, "
                          "finish_reason, latency_ms, created_at, recorded_at) VALUES "
                          "('old-1', 'legacyKey001', 'tiny-llama', 3, 4, 'cancelled', 5, :t, :t)"),
                     {"t": datetime(2025, 12, 1)})
    engine.dispose()

    store = MeteringStore(database_url, SECRET)
    store.migrate()
    [key] = store.list_keys()
    assert (key.key_id, key.tenant_id, key.scopes, key.models) == ("legacyKey001", "default", ("inference",), ())
    [row] = store.list_usage()
    assert (row.request_id, row.cost_nanos, row.price_version, row.cancelled) == ("old-1", 0, 0, True)
    assert row.trace_id == ""  # from before trace ids
    assert row.created_at == datetime(2025, 12, 1, tzinfo=UTC)
    assert current_revision(store.engine) == HEAD
    store.close()


def test_records_from_before_0006_keep_an_unknown_tier(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate(engine, "0005")
    at = datetime(2025, 12, 1, 12)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO usage_records (request_id, key_id, model, prompt_tokens, completion_tokens, "
                          "finish_reason, latency_ms, created_at, recorded_at, cost_nanos, cached_tokens) VALUES "
                          "('old-1', 'legacyKey001', 'tiny-llama', 30, 4, 'stop', 5, :t, :t, 100, 20)"), {"t": at})
    engine.dispose()

    store = MeteringStore(database_url, SECRET)
    store.migrate()
    assert current_revision(store.engine) == HEAD
    [row] = store.list_usage()
    assert (row.request_id, row.service_tier, row.cached_tokens) == ("old-1", "", 20)  # not known, not "default"
    [summary] = store.usage_summary(start=datetime(2025, 12, 1, tzinfo=UTC), end=datetime(2025, 12, 2, tzinfo=UTC))
    assert (summary.service_tier, summary.requests, summary.cached_tokens, summary.cost_nanos) == ("", 1, 20, 100)
    store.close()


def test_downgrade_to_the_first_cut_and_back(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate(engine)
    with engine.connect() as conn:
        command.downgrade(alembic_config(conn), "0001")
        conn.commit()
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) == {"alembic_version", "api_keys", "usage_records"}
    migrate(engine)
    assert current_revision(engine) == HEAD
    engine.dispose()
