"""The metering database: one engine per URL (SQLite file by default, PostgreSQL in production) and its
Alembic migrations, run programmatically (``upgrade head``) when metering or its CLI opens the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, event, inspect, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30.0
MIGRATIONS = "inferplane.metering:migrations"
# The revision whose schema databases made before migrations already have (``create_all`` of the first cut).
BASELINE_REVISION = "0001"
# pg_advisory_lock key: one migrator at a time per PostgreSQL database ("inferplane metering" as an int64).
PG_MIGRATION_LOCK = 0x696E66706C6D7472


def _is_memory_sqlite(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def make_engine(database_url: str) -> Engine:
    """An engine for ``database_url``; SQLite gets its parent folder, WAL and a busy timeout; PostgreSQL
    sessions run in UTC (so ``date(created_at)`` is the UTC day on both backends)."""
    url = make_url(database_url)
    # Bound parameters stay out of error messages (and so out of logs): they may hold key ids.
    kwargs: dict[str, Any] = {"hide_parameters": True, "pool_pre_ping": True}
    if url.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"options": "-c timezone=UTC"}
        return create_engine(url, pool_size=10, max_overflow=10, **kwargs)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, **kwargs)
    connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
    memory = _is_memory_sqlite(url)
    if memory:
        # One shared connection, or every pooled connection (and thread) would see its own empty database.
        kwargs["poolclass"] = StaticPool
    elif url.database and not url.database.startswith("file:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer (service + CLI)
                cursor.execute("PRAGMA synchronous=FULL")  # a committed usage record survives power loss
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        finally:
            cursor.close()

    return engine


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the packaged migrations (``connection``: run on it)."""
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database to ``revision``. Safe to run from several processes at once (a file lock on
    SQLite, an advisory lock on PostgreSQL); a database from before migrations is stamped at the baseline."""
    with _migration_lock(engine), engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        if "alembic_version" not in tables and "api_keys" in tables:
            log.info("metering database predates migrations: stamping revision %s", BASELINE_REVISION)
            command.stamp(alembic_config(conn), BASELINE_REVISION)
            conn.commit()
        command.upgrade(alembic_config(conn), revision)
        conn.commit()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if "alembic_version" not in inspect(conn).get_table_names():
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    url = engine.url
    if url.get_backend_name() == "sqlite" and not _is_memory_sqlite(url) and url.database \
            and not url.database.startswith("file:"):
        lock_path = Path(url.database).expanduser().with_name(Path(url.database).name + ".migrate-lock")
        with open(lock_path, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return
    if url.get_backend_name() == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_MIGRATION_LOCK})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_MIGRATION_LOCK})
                conn.commit()
        return
    yield
