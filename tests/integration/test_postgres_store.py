"""The metering store and its migrations on a real PostgreSQL: every test of the SQLite modules, run again.

Each test gets a database of its own (created and dropped here). The server is ``INFERPLANE_TEST_POSTGRES_URL``
(default: the local one CI runs, ``postgresql+psycopg://postgres@127.0.0.1:5432/test``); without it the tests
skip locally and fail in CI.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from tests.conftest import require
from tests.unit.test_metering_catalog import *  # noqa: F403  (the catalog tests, collected here again)
from tests.unit.test_metering_ledger import *  # noqa: F403  (the ledger tests, collected here again)
from tests.unit.test_metering_migrations import *  # noqa: F403  (the migration tests, collected here again)

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_url() -> str:
    return os.environ.get("INFERPLANE_TEST_POSTGRES_URL", DEFAULT_URL)


def postgres_available() -> bool:
    try:
        engine = create_engine(postgres_url(), connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except (OperationalError, ImportError):
        return False


@pytest.fixture
def database_url() -> Iterator[str]:  # overrides the SQLite one of the imported tests
    yield from fresh_postgres_database()


def fresh_postgres_database() -> Iterator[str]:
    """A new, empty database on the test server for the duration of one test."""
    require(postgres_available(), f"PostgreSQL at {make_url(postgres_url()).render_as_string()} is not reachable")
    name = f"inferplane_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_url()).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_postgres_sessions_run_in_utc(database_url: str) -> None:
    from inferplane.metering.db import make_engine

    engine = make_engine(database_url)
    with engine.connect() as conn:
        assert conn.execute(text("SHOW timezone")).scalar() == "UTC"
    engine.dispose()
