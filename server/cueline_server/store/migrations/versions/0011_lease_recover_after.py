"""when a worker claim may first be recovered; the lease index keyed on it

A claim is recoverable once its lease has expired and its worker is silent.
The lease index was keyed on `lease_expires_at`, so every claim-next, claim
and claimable list also read every expired lease whose worker was alive:
cueapi-worker never extends a lease per execution, so every handler running
past the lease (900 s) stayed in that range. With one server process, eight
workers and 20,000 such executions, claim-next fell from 1,740 to 653 cycles/s.

`recover_after` is the lease's end, set with it; the lease sweep moves it to
the moment the claimer's silence could begin (its last heartbeat plus the
heartbeat timeout) while the claimer is alive, and deleting a worker moves it
back to the lease's end. Existing claims start from their lease's end.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-23 23:00:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_executions_worker_leases"
ROWS = "transport = 'worker' AND status = 'delivering'"


def upgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "recover_after",
                sa.DateTime(timezone=True),
                nullable=True,
                comment="worker claims: not recoverable before (lease end; later while the claimer lives)",
            )
        )
    op.execute(f"UPDATE executions SET recover_after = lease_expires_at WHERE {ROWS}")
    with op.batch_alter_table("executions", schema=None) as batch_op:
        _key_lease_index(batch_op, "recover_after")


def downgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        _key_lease_index(batch_op, "lease_expires_at")
        batch_op.drop_column("recover_after")


def _key_lease_index(batch_op: Any, column: str) -> None:
    batch_op.drop_index(NAME)
    batch_op.create_index(
        NAME, ["account_id", column], unique=False, postgresql_where=sa.text(ROWS), sqlite_where=sa.text(ROWS)
    )
