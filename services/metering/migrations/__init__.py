"""Alembic migrations of the metering database (run by ``services.metering.db.migrate`` at start)."""
