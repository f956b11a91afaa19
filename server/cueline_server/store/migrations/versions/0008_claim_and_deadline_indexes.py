"""claim order and outcome deadline indexes

The claim queue reads pending executions by (account, status, scheduled_for,
created_at) and stops after the claim's limit; the previous index lacked
created_at, so every claim sorted all of an account's due executions. The
deadline sweep had no index at all and read the whole table on every pass.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-22 12:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AWAITING_OUTCOME = "outcome_deadline_at IS NOT NULL AND outcome_recorded_at IS NULL AND outcome_state IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_executions_account_id_status_scheduled_for"))
        batch_op.create_index(
            batch_op.f("ix_executions_account_id_status_scheduled_for_created_at"),
            ["account_id", "status", "scheduled_for", "created_at"],
            unique=False,
        )
        batch_op.create_index(
            "ix_executions_awaiting_outcome",
            ["outcome_deadline_at"],
            unique=False,
            postgresql_where=sa.text(AWAITING_OUTCOME),
            sqlite_where=sa.text(AWAITING_OUTCOME),
        )


def downgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_index("ix_executions_awaiting_outcome")
        batch_op.drop_index(batch_op.f("ix_executions_account_id_status_scheduled_for_created_at"))
        batch_op.create_index(
            batch_op.f("ix_executions_account_id_status_scheduled_for"),
            ["account_id", "status", "scheduled_for"],
            unique=False,
        )
