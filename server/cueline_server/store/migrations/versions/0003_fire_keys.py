"""fire idempotency keys

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 07:35:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "fire_keys",
        sa.Column("cue_id", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column(
            "request_hash", sa.String(length=64), nullable=False, comment="SHA-256 of the canonical fire body"
        ),
        sa.Column("execution_id", sa.Uuid(), nullable=False),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["cue_id"], ["cues.id"], name=op.f("fk_fire_keys_cue_id_cues"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("cue_id", "key", name=op.f("pk_fire_keys")),
        comment="idempotency keys of POST /v1/cues/{id}/fire, remembered for 24 h",
    )


def downgrade() -> None:
    op.drop_table("fire_keys")
