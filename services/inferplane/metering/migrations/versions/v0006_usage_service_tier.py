"""The service tier in the ledger: which tier ("default", "flex", "priority") served each usage record, whose cost
already includes that tier's price multiplier.

Existing usage rows get NULL (not known): the ledger did not keep the tier before, and a flex or priority request
recorded then cannot be told from a default one. Usage summaries report them under an empty tier.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("service_tier", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("service_tier")
