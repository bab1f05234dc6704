"""The model catalog as data: models with their versions, a catalog version counter, and the model version
stamped on each usage record.

The catalog starts empty at version 0; metering seeds it from catalog.yaml at its next start. Existing prices
and usage rows are untouched (usage rows from before have no model version).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from inferplane.metering.schema import UtcDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalog_models",
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("versions", sa.Text(), nullable=False),
        sa.Column("serving_version", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.Column("deleted_at", UtcDateTime(), nullable=True),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model", name="pk_catalog_models"),
    )
    state = op.create_table(
        "catalog_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_catalog_state"),
    )
    op.bulk_insert(state, [{"id": 1, "version": 0}])
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("model_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("model_version")
    op.drop_table("catalog_state")
    op.drop_table("catalog_models")
