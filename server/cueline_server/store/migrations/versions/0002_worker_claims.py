"""worker claims: lease expiry, availability, claim indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 07:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "lease_expires_at",
                sa.DateTime(timezone=True),
                nullable=True,
                comment="worker claims: when the lease runs out",
            )
        )
        batch_op.add_column(
            sa.Column(
                "available_at",
                sa.DateTime(timezone=True),
                nullable=True,
                comment="worker executions: when it last became claimable (for the unclaimed timeout)",
            )
        )
        batch_op.create_index(
            batch_op.f("ix_executions_account_id_status_scheduled_for"),
            ["account_id", "status", "scheduled_for"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_executions_status_lease_expires_at"), ["status", "lease_expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_executions_status_lease_expires_at"))
        batch_op.drop_index(batch_op.f("ix_executions_account_id_status_scheduled_for"))
        batch_op.drop_column("available_at")
        batch_op.drop_column("lease_expires_at")
