"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22 06:58:21.790282
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "accounts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(length=255), nullable=False),
        sa.Column("email_key", sa.String(length=255), nullable=False, comment="lower-cased email"),
        sa.Column("api_key_hash", sa.String(length=64), nullable=False, comment="SHA-256 of the key"),
        sa.Column("api_key_prefix", sa.String(length=12), nullable=False),
        sa.Column("previous_key_hash", sa.String(length=64), nullable=True),
        sa.Column("key_rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("webhook_secret", sa.String(length=80), nullable=False),
        sa.Column("plan", sa.String(length=32), nullable=False),
        sa.Column("active_cue_limit", sa.Integer(), nullable=False),
        sa.Column("monthly_execution_limit", sa.Integer(), nullable=False),
        sa.Column("rate_limit_per_minute", sa.Integer(), nullable=False),
        sa.Column("alert_webhook_url", sa.String(length=2048), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("api_key_hash", name=op.f("uq_accounts_api_key_hash")),
        sa.UniqueConstraint("email_key", name=op.f("uq_accounts_email_key")),
    )
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_accounts_previous_key_hash"), ["previous_key_hash"], unique=False
        )

    op.create_table(
        "cues",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("transport", sa.String(length=16), nullable=False),
        sa.Column("schedule_type", sa.String(length=16), nullable=False),
        sa.Column("cron", sa.String(length=100), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("callback_url", sa.String(length=2048), nullable=True),
        sa.Column("callback_method", sa.String(length=8), nullable=False),
        sa.Column("callback_headers", sa.Text(), nullable=False, comment="JSON object"),
        sa.Column("payload", sa.Text(), nullable=False, comment="JSON object"),
        sa.Column("retry_max_attempts", sa.Integer(), nullable=False),
        sa.Column("retry_backoff_minutes", sa.Text(), nullable=False, comment="JSON array"),
        sa.Column("on_failure_email", sa.Boolean(), nullable=False),
        sa.Column("on_failure_webhook", sa.String(length=2048), nullable=True),
        sa.Column("on_failure_pause", sa.Boolean(), nullable=False),
        sa.Column("verification_mode", sa.String(length=32), nullable=True),
        sa.Column("timeout_seconds", sa.Integer(), nullable=False),
        sa.Column("outcome_deadline_seconds", sa.Integer(), nullable=False),
        sa.Column("alert_consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("alert_missed_window_multiplier", sa.Integer(), nullable=False),
        sa.Column("catch_up", sa.String(length=32), nullable=False),
        sa.Column("next_run", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_run", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_count", sa.BigInteger(), nullable=False),
        sa.Column("fired_count", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_cues_account_id_accounts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cues")),
        sa.UniqueConstraint("account_id", "name", name=op.f("uq_cues_account_id_name")),
    )
    with op.batch_alter_table("cues", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_cues_account_id_created_at"), ["account_id", "created_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_cues_status_next_run"), ["status", "next_run"], unique=False)

    op.create_table(
        "workers",
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("worker_id", sa.String(length=255), nullable=False),
        sa.Column("handlers", sa.Text(), nullable=True, comment="JSON array"),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), nullable=False),
        sa.Column("registered_since", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_workers_account_id_accounts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("account_id", "worker_id", name=op.f("pk_workers")),
    )
    op.create_table(
        "executions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("cue_id", sa.String(length=16), nullable=False),
        sa.Column("transport", sa.String(length=16), nullable=False, comment="the cue's, fixed at creation"),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("triggered_by", sa.String(length=16), nullable=False),
        sa.Column("replayed_from", sa.Uuid(), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False, comment="JSON object snapshot"),
        sa.Column("task", sa.String(length=255), nullable=True, comment="payload.task, for claim filters"),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("next_retry", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_by_worker", sa.String(length=255), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome_deadline_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome_state", sa.String(length=32), nullable=True),
        sa.Column(
            "outcome_recorded_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="set once: the write-once guard",
        ),
        sa.Column("outcome_success", sa.Boolean(), nullable=True),
        sa.Column("outcome_result", sa.Text(), nullable=True),
        sa.Column("outcome_error", sa.Text(), nullable=True),
        sa.Column("outcome_metadata", sa.Text(), nullable=True, comment="JSON object"),
        sa.Column("outcome_late", sa.Boolean(), nullable=True),
        sa.Column(
            "outcome_verification_mode",
            sa.String(length=32),
            nullable=True,
            comment="the cue's mode at report time",
        ),
        sa.Column("external_id", sa.String(length=500), nullable=True),
        sa.Column("result_url", sa.String(length=2048), nullable=True),
        sa.Column("result_ref", sa.String(length=500), nullable=True),
        sa.Column("result_type", sa.String(length=100), nullable=True),
        sa.Column("summary", sa.String(length=500), nullable=True),
        sa.Column("artifacts", sa.Text(), nullable=True, comment="JSON array"),
        sa.Column("validation_state", sa.String(length=16), nullable=True),
        sa.Column("evidence_metadata", sa.Text(), nullable=True, comment="JSON object"),
        sa.Column("evidence_produced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_executions_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["cue_id"], ["cues.id"], name=op.f("fk_executions_cue_id_cues"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_executions")),
    )
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_executions_account_id_created_at"), ["account_id", "created_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_executions_cue_id_created_at"), ["cue_id", "created_at"], unique=False
        )
        batch_op.create_index(
            "uq_executions_scheduled_slot",
            ["cue_id", "scheduled_for"],
            unique=True,
            postgresql_where=sa.text("triggered_by = 'scheduled'"),
            sqlite_where=sa.text("triggered_by = 'scheduled'"),
        )


def downgrade() -> None:

    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_executions_scheduled_slot",
            postgresql_where=sa.text("triggered_by = 'scheduled'"),
            sqlite_where=sa.text("triggered_by = 'scheduled'"),
        )
        batch_op.drop_index(batch_op.f("ix_executions_cue_id_created_at"))
        batch_op.drop_index(batch_op.f("ix_executions_account_id_created_at"))

    op.drop_table("executions")
    op.drop_table("workers")
    with op.batch_alter_table("cues", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cues_status_next_run"))
        batch_op.drop_index(batch_op.f("ix_cues_account_id_created_at"))

    op.drop_table("cues")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_accounts_previous_key_hash"))

    op.drop_table("accounts")
