"""Alembic migrations of the metering database (run by ``inferplane.metering.db.migrate`` at start)."""
