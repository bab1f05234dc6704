"""Tenancy, key limits and expiry; costs in the ledger; versioned prices; budgets and reservations.

Existing keys join the "default" tenant with the "inference" scope and no limits; existing usage rows cost 0
at no price version (they were recorded before prices existed).

Revision ID: 0002
Revises: 0001
Create Date: 2025-12-15
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from inferplane.metering.schema import BigId, UtcDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("tenant_id", sa.String(64), server_default="default", nullable=False))
        batch.add_column(sa.Column("models", sa.Text(), nullable=True))
        batch.add_column(sa.Column("scopes", sa.String(200), server_default="inference", nullable=False))
        batch.add_column(sa.Column("expires_at", UtcDateTime(), nullable=True))
        batch.add_column(sa.Column("requests_per_minute", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("tokens_per_minute", sa.BigInteger(), nullable=True))
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])

    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("tenant_id", sa.String(64), server_default="default", nullable=False))
        batch.add_column(sa.Column("cost_nanos", sa.BigInteger(), server_default=sa.text("0"), nullable=False))
        batch.add_column(sa.Column("price_version", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("cached", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("cancelled", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.execute("UPDATE usage_records SET cancelled = (finish_reason = 'cancelled')")
    op.create_index("ix_usage_records_tenant_id_created_at", "usage_records", ["tenant_id", "created_at"])

    op.create_table(
        "prices",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("input_per_million_nanos", sa.BigInteger(), nullable=False),
        sa.Column("output_per_million_nanos", sa.BigInteger(), nullable=False),
        sa.Column("per_request_nanos", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_prices"),
    )
    op.create_index("ix_prices_model_id", "prices", ["model", "id"])

    op.create_table(
        "budgets",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("subject_id", sa.String(64), nullable=False),
        sa.Column("limit_nanos", sa.BigInteger(), nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("period_start", UtcDateTime(), nullable=False),
        sa.Column("spent_nanos", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("reserved_nanos", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_budgets"),
        sa.UniqueConstraint("scope", "subject_id", name="uq_budgets_scope_subject"),
    )

    op.create_table(
        "reservations",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("key_budget_id", sa.BigInteger(), nullable=True),
        sa.Column("tenant_budget_id", sa.BigInteger(), nullable=True),
        sa.Column("amount_nanos", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reservations"),
    )
    op.create_index("ix_reservations_expires_at", "reservations", ["expires_at"])


def downgrade() -> None:
    op.drop_table("reservations")
    op.drop_table("budgets")
    op.drop_table("prices")
    op.drop_index("ix_usage_records_tenant_id_created_at", "usage_records")
    with op.batch_alter_table("usage_records") as batch:
        for column in ("cancelled", "cached", "price_version", "cost_nanos", "tenant_id"):
            batch.drop_column(column)
    op.drop_index("ix_api_keys_tenant_id", "api_keys")
    with op.batch_alter_table("api_keys") as batch:
        for column in ("tokens_per_minute", "requests_per_minute", "expires_at", "scopes", "models", "tenant_id"):
            batch.drop_column(column)
