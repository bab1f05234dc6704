"""Prefix caching in the ledger: the prompt tokens a model reused from its prefix cache on each usage record, and
a cached-input price per price version.

Existing usage rows reused nothing (0); existing prices have no cached-input price (NULL: the input price).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("cached_tokens", sa.Integer(), server_default=sa.text("0"), nullable=False))
    with op.batch_alter_table("prices") as batch:
        batch.add_column(sa.Column("cached_input_per_million_nanos", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prices") as batch:
        batch.drop_column("cached_input_per_million_nanos")
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("cached_tokens")
