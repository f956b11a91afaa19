"""The schema as SQLAlchemy Core tables.

The Alembic migrations create exactly this schema (a test compares them on
SQLite and PostgreSQL). Enumerations are stored as their wire strings so the
tables read naturally in psql. Free-form JSON is stored as text, exactly as it
will be returned.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        moment: dt.datetime = value
        if moment.tzinfo is None:
            return moment.replace(tzinfo=dt.UTC)
        return moment.astimezone(dt.UTC)


accounts = Table(
    "accounts",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("email", String(255), nullable=False),
    Column("email_key", String(255), nullable=False, unique=True, comment="lower-cased email"),
    Column("api_key_hash", String(64), nullable=False, unique=True, comment="SHA-256 of the key"),
    Column("api_key_prefix", String(12), nullable=False),
    Column("previous_key_hash", String(64), nullable=True, index=True),
    Column("key_rotated_at", UTCDateTime, nullable=True),
    Column("webhook_secret", String(80), nullable=False),
    Column("plan", String(32), nullable=False),
    Column("active_cue_limit", Integer, nullable=False),
    Column("monthly_execution_limit", Integer, nullable=False),
    Column("rate_limit_per_minute", Integer, nullable=False),
    Column("alert_webhook_url", String(2048), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

cues = Table(
    "cues",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("account_id", Uuid, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(255), nullable=False),
    Column("description", Text, nullable=True),
    Column("status", String(16), nullable=False),
    Column("transport", String(16), nullable=False),
    Column("schedule_type", String(16), nullable=False),
    Column("cron", String(100), nullable=True),
    Column("at", UTCDateTime, nullable=True),
    Column("timezone", String(64), nullable=False),
    Column("callback_url", String(2048), nullable=True),
    Column("callback_method", String(8), nullable=False),
    Column("callback_headers", Text, nullable=False, comment="JSON object"),
    Column("payload", Text, nullable=False, comment="JSON object"),
    Column("retry_max_attempts", Integer, nullable=False),
    Column("retry_backoff_minutes", Text, nullable=False, comment="JSON array"),
    Column("on_failure_email", Boolean, nullable=False),
    Column("on_failure_webhook", String(2048), nullable=True),
    Column("on_failure_pause", Boolean, nullable=False),
    Column("verification_mode", String(32), nullable=True),
    Column("timeout_seconds", Integer, nullable=False),
    Column("outcome_deadline_seconds", Integer, nullable=False),
    Column("alert_consecutive_failures", Integer, nullable=False),
    Column("alert_missed_window_multiplier", Integer, nullable=False),
    Column("catch_up", String(32), nullable=False),
    Column("next_run", UTCDateTime, nullable=True),
    Column("last_run", UTCDateTime, nullable=True),
    Column("run_count", BigInteger, nullable=False),
    Column("fired_count", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("account_id", "name"),
    Index(None, "account_id", "created_at"),
    Index(None, "status", "next_run"),
)

# The cue statuses that count against an account's cue limit.
LIVE_CUE_STATUSES = ("active", "paused")

# Executions the outcome-deadline sweep looks at (a partial index's predicate).
AWAITING_OUTCOME = "outcome_deadline_at IS NOT NULL AND outcome_recorded_at IS NULL AND outcome_state IS NULL"
# Webhook executions the retry and stale-delivery sweeps look at. Partial indexes
# hold only these, so each sweep is an index look-up whatever the planner's
# statistics say; the queries spell the same values as literals, which is how a
# planner can tell that an index's predicate covers them.
RETRYING_WEBHOOKS = "transport = 'webhook' AND status = 'retrying'"
DELIVERING_WEBHOOKS = "transport = 'webhook' AND status = 'delivering'"
# Worker executions under a claim: the claim queue's second half (a lapsed lease)
# looks for these per account. Through the account's status index it read every
# execution the account had in flight, on every claim and every claimable list.
WORKER_LEASES = "transport = 'worker' AND status = 'delivering'"

executions = Table(
    "executions",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("account_id", Uuid, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("cue_id", String(16), ForeignKey("cues.id", ondelete="CASCADE"), nullable=False),
    Column("transport", String(16), nullable=False, comment="the cue's, fixed at creation"),
    Column("scheduled_for", UTCDateTime, nullable=False),
    Column("status", String(16), nullable=False),
    Column("triggered_by", String(16), nullable=False),
    Column("replayed_from", Uuid, nullable=True),
    Column("payload", Text, nullable=False, comment="JSON object snapshot"),
    Column("task", String(255), nullable=True, comment="payload.task, for claim filters"),
    Column("http_status", Integer, nullable=True),
    Column("response_body", Text, nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("error_message", Text, nullable=True),
    Column("next_retry", UTCDateTime, nullable=True),
    Column("started_at", UTCDateTime, nullable=True),
    Column("delivered_at", UTCDateTime, nullable=True),
    Column("last_attempt_at", UTCDateTime, nullable=True),
    Column("claimed_by_worker", String(255), nullable=True),
    Column("claimed_at", UTCDateTime, nullable=True),
    Column("last_heartbeat_at", UTCDateTime, nullable=True),
    Column("outcome_deadline_at", UTCDateTime, nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True, comment="worker claims: when the lease runs out"),
    Column(
        "recover_after",
        UTCDateTime,
        nullable=True,
        comment="worker claims: not recoverable before (lease end; later while the claimer lives)",
    ),
    Column(
        "available_at",
        UTCDateTime,
        nullable=True,
        comment="worker executions: when it last became claimable (for the unclaimed timeout)",
    ),
    Column("outcome_state", String(32), nullable=True),
    Column("outcome_recorded_at", UTCDateTime, nullable=True, comment="set once: the write-once guard"),
    Column("outcome_success", Boolean, nullable=True),
    Column("outcome_result", Text, nullable=True),
    Column("outcome_error", Text, nullable=True),
    Column("outcome_metadata", Text, nullable=True, comment="JSON object"),
    Column("outcome_late", Boolean, nullable=True),
    Column("outcome_verification_mode", String(32), nullable=True, comment="the cue's mode at report time"),
    Column(
        "outcome_reported_state", String(32), nullable=True, comment="outcome_state right after the report"
    ),
    Column("outcome_request_key", String(255), nullable=True, comment="the report's idempotency key"),
    Column("outcome_request_hash", String(64), nullable=True, comment="SHA-256 of the canonical report"),
    Column("external_id", String(500), nullable=True),
    Column("result_url", String(2048), nullable=True),
    Column("result_ref", String(500), nullable=True),
    Column("result_type", String(100), nullable=True),
    Column("summary", String(500), nullable=True),
    Column("artifacts", Text, nullable=True, comment="JSON array"),
    Column("validation_state", String(16), nullable=True),
    Column("evidence_metadata", Text, nullable=True, comment="JSON object"),
    Column("evidence_produced_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index(None, "account_id", "created_at"),
    Index(None, "cue_id", "created_at"),
    # Claims and sweeps: what is claimable, in claim order, and what is
    # delivering with a lease.
    Index(None, "account_id", "status", "scheduled_for", "created_at"),
    Index(None, "status", "lease_expires_at"),
    Index(None, "transport", "status", "scheduled_for"),
    Index(
        "ix_executions_worker_leases",
        "account_id",
        "recover_after",
        postgresql_where=text(WORKER_LEASES),
        sqlite_where=text(WORKER_LEASES),
    ),
    # The deadline sweep: only executions with a deadline, still waiting for their
    # outcome (not every new execution, which has no deadline until it is delivered).
    Index(
        "ix_executions_awaiting_outcome",
        "outcome_deadline_at",
        postgresql_where=text(AWAITING_OUTCOME),
        sqlite_where=text(AWAITING_OUTCOME),
    ),
    Index(
        "ix_executions_retrying_webhooks",
        "next_retry",
        postgresql_where=text(RETRYING_WEBHOOKS),
        sqlite_where=text(RETRYING_WEBHOOKS),
    ),
    Index(
        "ix_executions_delivering_webhooks",
        "last_attempt_at",
        postgresql_where=text(DELIVERING_WEBHOOKS),
        sqlite_where=text(DELIVERING_WEBHOOKS),
    ),
    # Exactly one scheduled execution per cron slot, across replicas and restarts.
    Index(
        "uq_executions_scheduled_slot",
        "cue_id",
        "scheduled_for",
        unique=True,
        postgresql_where=text("triggered_by = 'scheduled'"),
        sqlite_where=text("triggered_by = 'scheduled'"),
    ),
)

workers = Table(
    "workers",
    metadata,
    Column("account_id", Uuid, ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True),
    Column("worker_id", String(255), primary_key=True),
    Column("handlers", Text, nullable=True, comment="JSON array"),
    Column("last_heartbeat", UTCDateTime, nullable=False),
    Column("registered_since", UTCDateTime, nullable=False),
)

fire_keys = Table(
    "fire_keys",
    metadata,
    Column("cue_id", String(16), ForeignKey("cues.id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False, comment="SHA-256 of the canonical fire body"),
    Column("execution_id", Uuid, nullable=False),
    Column("scheduled_for", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    comment="idempotency keys of POST /v1/cues/{id}/fire, remembered for 24 h",
)

alerts = Table(
    "alerts",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("account_id", Uuid, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("cue_id", String(16), ForeignKey("cues.id", ondelete="SET NULL"), nullable=True),
    Column("execution_id", Uuid, ForeignKey("executions.id", ondelete="SET NULL"), nullable=True),
    Column("alert_type", String(32), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("metadata", Text, nullable=False, comment="JSON object"),
    Column("acknowledged", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "account_id", "created_at"),
    Index(None, "account_id", "alert_type", "execution_id", "created_at"),
)

# --- partner actions -------------------------------------------------------------------------------
# Actions are cues of kind "action". Their ids are UUIDs (partners address them as
# cue_id) and they are never scheduled or delivered, so they live in their own
# tables: `actions` is the cue, `action_attempts` its executions with write-once
# outcomes, and `action_events` the audit trail.

organizations = Table(
    "organizations",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("account_id", Uuid, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

members = Table(
    "members",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column(
        "organization_id",
        Uuid,
        ForeignKey("organizations.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("external_ref", String(255), nullable=True),
    Column("disabled", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

oauth_clients = Table(
    "oauth_clients",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column(
        "organization_id",
        Uuid,
        ForeignKey("organizations.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("name", String(200), nullable=False),
    Column("secret_hash", String(64), nullable=False, comment="SHA-256 of the client secret"),
    Column("disabled", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

partner_users = Table(
    "partner_users",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column(
        "organization_id",
        Uuid,
        ForeignKey("organizations.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("username", String(150), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False, comment="pbkdf2_sha256$iterations$salt$hash"),
    Column("disabled", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

partner_tokens = Table(
    "partner_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True, comment="SHA-256 of the token"),
    Column("kind", String(8), nullable=False, comment="access or refresh"),
    Column("organization_id", Uuid, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False),
    Column(
        "client_id",
        String(64),
        ForeignKey("oauth_clients.client_id", ondelete="CASCADE"),
        nullable=True,
        index=True,
    ),
    Column("user_id", Uuid, ForeignKey("partner_users.id", ondelete="CASCADE"), nullable=True, index=True),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("used_at", UTCDateTime, nullable=True, comment="refresh tokens: set when exchanged (they rotate)"),
    Column("created_at", UTCDateTime, nullable=False),
)

actions = Table(
    "actions",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("organization_id", Uuid, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False),
    Column("subject", String(256), nullable=False),
    Column("code", String(64), nullable=False),
    Column("title", String(200), nullable=True),
    Column("message", Text, nullable=True),
    Column("data", Text, nullable=True, comment="JSON object"),
    Column("required_parameters", Text, nullable=False, comment="JSON array"),
    Column("redirect_url_template", String(2048), nullable=True),
    Column("request_id", Uuid, nullable=True),
    Column("state", String(16), nullable=False, comment="pending, in_progress or completed"),
    Column("created_at", UTCDateTime, nullable=False),
    Column("completed_at", UTCDateTime, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("organization_id", "request_id"),
    Index(None, "organization_id", "subject", "state"),
)

action_attempts = Table(
    "action_attempts",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("action_id", Uuid, ForeignKey("actions.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("member_id", Uuid, nullable=False),
    Column("secret_hash", String(64), nullable=True, comment="SHA-256 of the secret that started it"),
    Column("parameters", Text, nullable=False, comment="JSON object"),
    Column("state", String(16), nullable=False, comment="in_progress, succeeded, failed or abandoned"),
    Column("started_at", UTCDateTime, nullable=False),
    Column("closed_at", UTCDateTime, nullable=True),
    Column("outcome_recorded_at", UTCDateTime, nullable=True, comment="set once: the write-once guard"),
    Column("outcome_success", Boolean, nullable=True),
    Column("outcome_payload", Text, nullable=True, comment="JSON object"),
    # At most one open attempt per action, whatever races.
    Index(
        "uq_action_attempts_open",
        "action_id",
        unique=True,
        postgresql_where=text("state = 'in_progress'"),
        sqlite_where=text("state = 'in_progress'"),
    ),
)

action_events = Table(
    "action_events",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("action_id", Uuid, ForeignKey("actions.id", ondelete="CASCADE"), nullable=False),
    Column("attempt_id", Uuid, nullable=False),
    Column("type", String(8), nullable=False, comment="start, outcome or read"),
    Column("state", String(8), nullable=True, comment="success or fail (outcome events)"),
    Column("member_id", Uuid, nullable=False),
    Column("time", UTCDateTime, nullable=False),
    Column("location", Text, nullable=True, comment="JSON"),
    Column("client_info", Text, nullable=True, comment="JSON"),
    Column("remote_address", String(255), nullable=False),
    Column("user_agent", Text, nullable=False),
    Column("parameters", Text, nullable=True, comment="JSON object"),
    Column("payload", Text, nullable=True, comment="JSON"),
    Column("superseded_attempt_id", Uuid, nullable=True),
    Index(None, "action_id", "time", "id"),
)
