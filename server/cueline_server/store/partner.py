"""The SQL for partner actions and the partner directory (organizations,
members, OAuth clients, password users, tokens)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, insert, or_, select, update

from cueline_server.store.repositories import AnyRow, _Repository
from cueline_server.store.tables import (
    action_attempts,
    action_events,
    actions,
    members,
    oauth_clients,
    organizations,
    partner_tokens,
    partner_users,
)


class PartnerRepository(_Repository):
    # --- directory ------------------------------------------------------------------------------

    async def add_organization(self, values: Mapping[str, Any]) -> None:
        await self._insert(organizations, values)

    async def organization(self, organization_id: uuid.UUID, account_id: uuid.UUID) -> AnyRow | None:
        result = await self.conn.execute(
            select(organizations).where(
                organizations.c.id == organization_id, organizations.c.account_id == account_id
            )
        )
        return result.first()

    async def add_member(self, values: Mapping[str, Any]) -> None:
        await self._insert(members, values)

    async def member(self, member_id: uuid.UUID) -> AnyRow | None:
        return (await self.conn.execute(select(members).where(members.c.id == member_id))).first()

    async def owned_member(self, member_id: uuid.UUID, account_id: uuid.UUID) -> AnyRow | None:
        result = await self.conn.execute(
            select(members)
            .join(organizations, organizations.c.id == members.c.organization_id)
            .where(members.c.id == member_id, organizations.c.account_id == account_id)
        )
        return result.first()

    async def disable_member(self, member_id: uuid.UUID) -> None:
        await self.conn.execute(update(members).where(members.c.id == member_id).values(disabled=True))

    async def add_client(self, values: Mapping[str, Any]) -> None:
        await self._insert(oauth_clients, values)

    async def client(self, client_id: str) -> AnyRow | None:
        result = await self.conn.execute(select(oauth_clients).where(oauth_clients.c.client_id == client_id))
        return result.first()

    async def owned_client(self, client_id: str, account_id: uuid.UUID) -> AnyRow | None:
        result = await self.conn.execute(
            select(oauth_clients)
            .join(organizations, organizations.c.id == oauth_clients.c.organization_id)
            .where(oauth_clients.c.client_id == client_id, organizations.c.account_id == account_id)
        )
        return result.first()

    async def disable_client(self, client_id: str) -> None:
        await self.conn.execute(
            update(oauth_clients).where(oauth_clients.c.client_id == client_id).values(disabled=True)
        )

    async def add_user(self, values: Mapping[str, Any]) -> None:
        await self._insert(partner_users, values)

    async def user(self, username: str) -> AnyRow | None:
        result = await self.conn.execute(select(partner_users).where(partner_users.c.username == username))
        return result.first()

    async def user_by_id(self, user_id: uuid.UUID) -> AnyRow | None:
        result = await self.conn.execute(select(partner_users).where(partner_users.c.id == user_id))
        return result.first()

    async def owned_user(self, username: str, account_id: uuid.UUID) -> AnyRow | None:
        result = await self.conn.execute(
            select(partner_users)
            .join(organizations, organizations.c.id == partner_users.c.organization_id)
            .where(partner_users.c.username == username, organizations.c.account_id == account_id)
        )
        return result.first()

    async def disable_user(self, user_id: uuid.UUID) -> None:
        await self.conn.execute(
            update(partner_users).where(partner_users.c.id == user_id).values(disabled=True)
        )

    # --- tokens ---------------------------------------------------------------------------------

    async def add_tokens(self, rows: Sequence[Mapping[str, Any]]) -> None:
        await self.conn.execute(insert(partner_tokens), list(rows))

    async def access_token(self, token_hash: str, now: dt.datetime) -> AnyRow | None:
        """A live access token whose client or user is still enabled (a token issued
        while its issuer was being disabled dies with it, whatever the timing)."""
        t = partner_tokens
        result = await self.conn.execute(
            select(t.c.organization_id)
            .select_from(
                t.outerjoin(oauth_clients, oauth_clients.c.client_id == t.c.client_id).outerjoin(
                    partner_users, partner_users.c.id == t.c.user_id
                )
            )
            .where(
                t.c.token_hash == token_hash,
                t.c.kind == "access",
                t.c.revoked_at.is_(None),
                t.c.expires_at > now,
                or_(oauth_clients.c.disabled.is_(None), oauth_clients.c.disabled.is_(False)),
                or_(partner_users.c.disabled.is_(None), partner_users.c.disabled.is_(False)),
            )
        )
        return result.first()

    async def use_refresh_token(self, token_hash: str, now: dt.datetime) -> AnyRow | None:
        """Spends a live refresh token (each works once): its user and organization, or None."""
        result = await self.conn.execute(
            update(partner_tokens)
            .where(
                partner_tokens.c.token_hash == token_hash,
                partner_tokens.c.kind == "refresh",
                partner_tokens.c.used_at.is_(None),
                partner_tokens.c.revoked_at.is_(None),
                partner_tokens.c.expires_at > now,
            )
            .values(used_at=now)
            .returning(partner_tokens.c.user_id, partner_tokens.c.organization_id)
        )
        return result.first()

    async def token_owner(self, token_hash: str, account_id: uuid.UUID) -> bool:
        """Whether the token belongs to one of the account's organizations."""
        result = await self.conn.execute(
            select(partner_tokens.c.token_hash)
            .join(organizations, organizations.c.id == partner_tokens.c.organization_id)
            .where(partner_tokens.c.token_hash == token_hash, organizations.c.account_id == account_id)
        )
        return result.first() is not None

    async def revoke_tokens(self, condition: ColumnElement[bool], now: dt.datetime) -> int:
        result = await self.conn.execute(
            update(partner_tokens)
            .where(condition, partner_tokens.c.revoked_at.is_(None))
            .values(revoked_at=now)
            .returning(partner_tokens.c.token_hash)
        )
        return len(result.all())

    # --- actions --------------------------------------------------------------------------------

    async def add_action(self, values: Mapping[str, Any]) -> None:
        await self._insert(actions, values)

    async def action(self, action_id: uuid.UUID, *, lock: bool = False) -> AnyRow | None:
        statement = select(actions).where(actions.c.id == action_id)
        if lock:
            statement = statement.with_for_update()
        return (await self.conn.execute(statement)).first()

    async def owned_action(self, organization_id: uuid.UUID, action_id: uuid.UUID) -> AnyRow | None:
        result = await self.conn.execute(
            select(actions).where(actions.c.id == action_id, actions.c.organization_id == organization_id)
        )
        return result.first()

    async def action_by_request(self, organization_id: uuid.UUID, request_id: uuid.UUID) -> AnyRow | None:
        result = await self.conn.execute(
            select(actions).where(
                actions.c.organization_id == organization_id, actions.c.request_id == request_id
            )
        )
        return result.first()

    async def active_actions(self, organization_id: uuid.UUID, subject: str) -> Sequence[AnyRow]:
        result = await self.conn.execute(
            select(actions)
            .where(
                actions.c.organization_id == organization_id,
                actions.c.subject == subject,
                actions.c.state != "completed",
            )
            .order_by(actions.c.created_at, actions.c.id)
        )
        return result.all()

    async def set_action_state(self, action_id: uuid.UUID, state: str, now: dt.datetime) -> None:
        await self.conn.execute(
            update(actions)
            .where(actions.c.id == action_id)
            .values(state=state, updated_at=now, completed_at=now if state == "completed" else None)
        )

    async def open_attempt(self, action_id: uuid.UUID) -> AnyRow | None:
        result = await self.conn.execute(
            select(action_attempts).where(
                action_attempts.c.action_id == action_id, action_attempts.c.state == "in_progress"
            )
        )
        return result.first()

    async def add_attempt(self, values: Mapping[str, Any]) -> None:
        await self._insert(action_attempts, values)

    async def abandon_attempt(self, attempt_id: uuid.UUID, now: dt.datetime) -> None:
        await self.conn.execute(
            update(action_attempts)
            .where(action_attempts.c.id == attempt_id, action_attempts.c.state == "in_progress")
            .values(state="abandoned", closed_at=now)
        )

    async def record_outcome(
        self, attempt_id: uuid.UUID, success: bool, payload: str | None, now: dt.datetime
    ) -> bool:
        """Writes the attempt's outcome once; False when another writer got there first."""
        result = await self.conn.execute(
            update(action_attempts)
            .where(
                action_attempts.c.id == attempt_id,
                action_attempts.c.state == "in_progress",
                action_attempts.c.outcome_recorded_at.is_(None),
            )
            .values(
                state="succeeded" if success else "failed",
                closed_at=now,
                outcome_recorded_at=now,
                outcome_success=success,
                outcome_payload=payload,
            )
            .returning(action_attempts.c.id)
        )
        return result.first() is not None

    async def add_event(self, values: Mapping[str, Any]) -> None:
        await self.conn.execute(insert(action_events), dict(values))

    async def events(
        self, action_id: uuid.UUID, after: tuple[dt.datetime, uuid.UUID] | None, limit: int
    ) -> Sequence[AnyRow]:
        condition: ColumnElement[bool] = action_events.c.action_id == action_id
        if after is not None:
            condition = and_(
                condition,
                or_(
                    action_events.c.time > after[0],
                    and_(action_events.c.time == after[0], action_events.c.id > after[1]),
                ),
            )
        result = await self.conn.execute(
            select(action_events)
            .where(condition)
            .order_by(action_events.c.time, action_events.c.id)
            .limit(limit)
        )
        return result.all()
