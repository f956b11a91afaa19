"""partner actions

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22 09:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "organizations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_organizations_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organizations")),
    )
    with op.batch_alter_table("organizations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_organizations_account_id"), ["account_id"], unique=False)

    op.create_table(
        "actions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("subject", sa.String(length=256), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("data", sa.Text(), nullable=True, comment="JSON object"),
        sa.Column("required_parameters", sa.Text(), nullable=False, comment="JSON array"),
        sa.Column("redirect_url_template", sa.String(length=2048), nullable=True),
        sa.Column("request_id", sa.Uuid(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False, comment="pending, in_progress or completed"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_actions_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_actions")),
        sa.UniqueConstraint(
            "organization_id", "request_id", name=op.f("uq_actions_organization_id_request_id")
        ),
    )
    with op.batch_alter_table("actions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_actions_organization_id_subject_state"),
            ["organization_id", "subject", "state"],
            unique=False,
        )

    op.create_table(
        "members",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("external_ref", sa.String(length=255), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_members_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_members")),
    )
    with op.batch_alter_table("members", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_members_organization_id"), ["organization_id"], unique=False)

    op.create_table(
        "oauth_clients",
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column(
            "secret_hash", sa.String(length=64), nullable=False, comment="SHA-256 of the client secret"
        ),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_oauth_clients_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("client_id", name=op.f("pk_oauth_clients")),
    )
    with op.batch_alter_table("oauth_clients", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_oauth_clients_organization_id"), ["organization_id"], unique=False
        )

    op.create_table(
        "partner_users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("username", sa.String(length=150), nullable=False),
        sa.Column(
            "password_hash",
            sa.String(length=255),
            nullable=False,
            comment="pbkdf2_sha256$iterations$salt$hash",
        ),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_partner_users_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_partner_users")),
        sa.UniqueConstraint("username", name=op.f("uq_partner_users_username")),
    )
    with op.batch_alter_table("partner_users", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_partner_users_organization_id"), ["organization_id"], unique=False
        )

    op.create_table(
        "action_attempts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("action_id", sa.Uuid(), nullable=False),
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column(
            "secret_hash",
            sa.String(length=64),
            nullable=True,
            comment="SHA-256 of the secret that started it",
        ),
        sa.Column("parameters", sa.Text(), nullable=False, comment="JSON object"),
        sa.Column(
            "state",
            sa.String(length=16),
            nullable=False,
            comment="in_progress, succeeded, failed or abandoned",
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "outcome_recorded_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="set once: the write-once guard",
        ),
        sa.Column("outcome_success", sa.Boolean(), nullable=True),
        sa.Column("outcome_payload", sa.Text(), nullable=True, comment="JSON object"),
        sa.ForeignKeyConstraint(
            ["action_id"],
            ["actions.id"],
            name=op.f("fk_action_attempts_action_id_actions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_action_attempts")),
    )
    with op.batch_alter_table("action_attempts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_action_attempts_action_id"), ["action_id"], unique=False)
        batch_op.create_index(
            "uq_action_attempts_open",
            ["action_id"],
            unique=True,
            postgresql_where=sa.text("state = 'in_progress'"),
            sqlite_where=sa.text("state = 'in_progress'"),
        )

    op.create_table(
        "action_events",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("action_id", sa.Uuid(), nullable=False),
        sa.Column("attempt_id", sa.Uuid(), nullable=False),
        sa.Column("type", sa.String(length=8), nullable=False, comment="start, outcome or read"),
        sa.Column("state", sa.String(length=8), nullable=True, comment="success or fail (outcome events)"),
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("location", sa.Text(), nullable=True, comment="JSON"),
        sa.Column("client_info", sa.Text(), nullable=True, comment="JSON"),
        sa.Column("remote_address", sa.String(length=255), nullable=False),
        sa.Column("user_agent", sa.Text(), nullable=False),
        sa.Column("parameters", sa.Text(), nullable=True, comment="JSON object"),
        sa.Column("payload", sa.Text(), nullable=True, comment="JSON"),
        sa.Column("superseded_attempt_id", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(
            ["action_id"], ["actions.id"], name=op.f("fk_action_events_action_id_actions"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_action_events")),
    )
    with op.batch_alter_table("action_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_action_events_action_id_time_id"), ["action_id", "time", "id"], unique=False
        )

    op.create_table(
        "partner_tokens",
        sa.Column("token_hash", sa.String(length=64), nullable=False, comment="SHA-256 of the token"),
        sa.Column("kind", sa.String(length=8), nullable=False, comment="access or refresh"),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=True),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "used_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="refresh tokens: set when exchanged (they rotate)",
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["oauth_clients.client_id"],
            name=op.f("fk_partner_tokens_client_id_oauth_clients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_partner_tokens_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["partner_users.id"],
            name=op.f("fk_partner_tokens_user_id_partner_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_partner_tokens")),
    )
    with op.batch_alter_table("partner_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_partner_tokens_client_id"), ["client_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_partner_tokens_user_id"), ["user_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("partner_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_partner_tokens_user_id"))
        batch_op.drop_index(batch_op.f("ix_partner_tokens_client_id"))

    op.drop_table("partner_tokens")
    with op.batch_alter_table("action_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_action_events_action_id_time_id"))

    op.drop_table("action_events")
    with op.batch_alter_table("action_attempts", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_action_attempts_open",
            postgresql_where=sa.text("state = 'in_progress'"),
            sqlite_where=sa.text("state = 'in_progress'"),
        )
        batch_op.drop_index(batch_op.f("ix_action_attempts_action_id"))

    op.drop_table("action_attempts")
    with op.batch_alter_table("partner_users", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_partner_users_organization_id"))

    op.drop_table("partner_users")
    with op.batch_alter_table("oauth_clients", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_oauth_clients_organization_id"))

    op.drop_table("oauth_clients")
    with op.batch_alter_table("members", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_members_organization_id"))

    op.drop_table("members")
    with op.batch_alter_table("actions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_actions_organization_id_subject_state"))

    op.drop_table("actions")
    with op.batch_alter_table("organizations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_organizations_account_id"))

    op.drop_table("organizations")
