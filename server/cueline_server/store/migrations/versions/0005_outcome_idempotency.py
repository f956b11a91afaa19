"""idempotent outcome reports

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 08:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "outcome_reported_state",
                sa.String(length=32),
                nullable=True,
                comment="outcome_state right after the report",
            )
        )
        batch_op.add_column(
            sa.Column(
                "outcome_request_key",
                sa.String(length=255),
                nullable=True,
                comment="the report's idempotency key",
            )
        )
        batch_op.add_column(
            sa.Column(
                "outcome_request_hash",
                sa.String(length=64),
                nullable=True,
                comment="SHA-256 of the canonical report",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_column("outcome_request_hash")
        batch_op.drop_column("outcome_request_key")
        batch_op.drop_column("outcome_reported_state")
