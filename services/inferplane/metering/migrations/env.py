"""Alembic environment: migrations run on the connection ``inferplane.metering.db.migrate`` hands over
(``config.attributes["connection"]``), or on ``sqlalchemy.url`` when run from the ``alembic`` command."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from inferplane.metering.schema import Base

config = context.config


def _run(connection: Connection) -> None:
    # render_as_batch: SQLite alters a table by copying it, which batch mode does for us.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite:///.inferplane/metering.db")
    with engine.begin() as conn:
        _run(conn)
