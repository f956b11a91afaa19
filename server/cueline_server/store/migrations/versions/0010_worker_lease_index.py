"""a partial index of worker executions under a claim, by account and lease

Every claim-next and claimable list also looks for the account's lapsed
leases. It found them through the (account_id, status, scheduled_for,
created_at) index, in claim order, reading every execution the account had
in flight and filtering on the lease. With one server process and eight
callers, claim-next cost PostgreSQL 0.24 ms of CPU per claim at first and
0.79 ms once 20,000 were in flight (2,700 falling to 1,075 claims/s); through
this index, 0.09 ms throughout (3,600-3,900 claims/s). It holds only worker
executions under a claim: a claim adds an entry, the report that ends it none.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-23 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_executions_worker_leases"
ROWS = "transport = 'worker' AND status = 'delivering'"


def upgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.create_index(
            NAME,
            ["account_id", "lease_expires_at"],
            unique=False,
            postgresql_where=sa.text(ROWS),
            sqlite_where=sa.text(ROWS),
        )


def downgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_index(NAME)
