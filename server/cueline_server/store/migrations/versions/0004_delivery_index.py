"""index for due webhook deliveries

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 07:55:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_executions_transport_status_scheduled_for"),
            ["transport", "status", "scheduled_for"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_executions_transport_status_scheduled_for"))
