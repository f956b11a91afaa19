"""partial indexes for the webhook retry and stale-delivery sweeps

Both sweeps run every scheduler pass. They found their rows through the
(transport, status, scheduled_for) index, whose columns narrow a table of
worker executions by nothing: once ANALYZE had recorded that, SQLite read the
whole executions table twice a second. These indexes hold only retrying and
only delivering webhook executions.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WEBHOOKS = "transport = 'webhook' AND status = "
# (index, column, which rows it holds)
INDEXES = (
    ("ix_executions_retrying_webhooks", "next_retry", WEBHOOKS + "'retrying'"),
    ("ix_executions_delivering_webhooks", "last_attempt_at", WEBHOOKS + "'delivering'"),
)


def upgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        for name, column, rows in INDEXES:
            batch_op.create_index(
                name, [column], unique=False, postgresql_where=sa.text(rows), sqlite_where=sa.text(rows)
            )


def downgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        for name, _, _ in reversed(INDEXES):
            batch_op.drop_index(name)
