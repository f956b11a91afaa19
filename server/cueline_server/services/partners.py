"""The partner directory and partner OAuth2 tokens.

An organization belongs to the account that created it; only that account's
internal callers manage its members, clients and users. Partner tokens act
for one organization on the partner surface and nowhere else.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hmac
import uuid
from dataclasses import dataclass

from cueline_server.errors import (
    ApiError,
    field_error,
    invalid_client,
    invalid_credentials,
    not_found,
    partner_unauthenticated,
)
from cueline_server.services.credentials import (
    DUMMY_PASSWORD_HASH,
    check_password,
    hash_password,
    new_client_id,
    new_token,
    token_hash,
)
from cueline_server.store.database import Database, UnitOfWork
from cueline_server.store.repositories import AnyRow, DuplicateError
from cueline_server.store.tables import partner_tokens

ACCESS_TOKEN_LIFETIME = dt.timedelta(seconds=36000)
REFRESH_TOKEN_LIFETIME = dt.timedelta(days=30)
SCOPE = "read write"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def parse_uuid(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise field_error(field, "Input should be a valid UUID") from None


def organization_not_found() -> ApiError:
    return not_found("organization_not_found", "Organization not found")


@dataclass(frozen=True)
class PartnerCaller:
    """Who a partner access token acts for."""

    organization_id: uuid.UUID


@dataclass(frozen=True)
class IssuedTokens:
    access_token: str
    expires_in: int
    refresh_token: str | None


class DirectoryService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def _owned_organization(self, account_id: uuid.UUID, organization_id: str) -> AnyRow:
        org_id = parse_uuid(organization_id, "organization_id")
        async with self._db.unit_of_work(write=False) as uow:
            row = await uow.partner.organization(org_id, account_id)
        if row is None:
            raise organization_not_found()
        return row

    async def create_organization(self, account_id: uuid.UUID, name: str) -> AnyRow:
        org_id = uuid.uuid4()
        values = {"id": org_id, "account_id": account_id, "name": name.strip(), "created_at": now()}
        async with self._db.unit_of_work() as uow:
            await uow.partner.add_organization(values)
            row = await uow.partner.organization(org_id, account_id)
            await uow.commit()
        assert row is not None
        return row

    async def create_member(
        self, account_id: uuid.UUID, organization_id: str, external_ref: str | None
    ) -> AnyRow:
        org = await self._owned_organization(account_id, organization_id)
        member_id = uuid.uuid4()
        async with self._db.unit_of_work() as uow:
            await uow.partner.add_member(
                {
                    "id": member_id,
                    "organization_id": org.id,
                    "external_ref": external_ref,
                    "disabled": False,
                    "created_at": now(),
                }
            )
            row = await uow.partner.member(member_id)
            await uow.commit()
        assert row is not None
        return row

    async def disable_member(self, account_id: uuid.UUID, member_id: str) -> AnyRow:
        parsed = parse_uuid(member_id, "member_id")
        async with self._db.unit_of_work() as uow:
            if await uow.partner.owned_member(parsed, account_id) is None:
                raise not_found("member_not_found", "Member not found")
            await uow.partner.disable_member(parsed)
            row = await uow.partner.member(parsed)
            await uow.commit()
        assert row is not None
        return row

    async def create_client(
        self, account_id: uuid.UUID, organization_id: str, name: str
    ) -> tuple[AnyRow, str]:
        org = await self._owned_organization(account_id, organization_id)
        client_id, secret = new_client_id(), new_token()
        async with self._db.unit_of_work() as uow:
            await uow.partner.add_client(
                {
                    "client_id": client_id,
                    "organization_id": org.id,
                    "name": name.strip(),
                    "secret_hash": token_hash(secret),
                    "disabled": False,
                    "created_at": now(),
                }
            )
            row = await uow.partner.client(client_id)
            await uow.commit()
        assert row is not None
        return row, secret

    async def disable_client(self, account_id: uuid.UUID, client_id: str) -> tuple[AnyRow, int]:
        async with self._db.unit_of_work() as uow:
            if await uow.partner.owned_client(client_id, account_id) is None:
                raise not_found("client_not_found", "Client not found")
            await uow.partner.disable_client(client_id)
            revoked = await uow.partner.revoke_tokens(partner_tokens.c.client_id == client_id, now())
            row = await uow.partner.client(client_id)
            await uow.commit()
        assert row is not None
        return row, revoked

    async def create_user(
        self, account_id: uuid.UUID, organization_id: str, username: str, password: str
    ) -> AnyRow:
        org = await self._owned_organization(account_id, organization_id)
        hashed = await asyncio.to_thread(hash_password, password)
        user_id = uuid.uuid4()
        async with self._db.unit_of_work() as uow:
            try:
                await uow.partner.add_user(
                    {
                        "id": user_id,
                        "organization_id": org.id,
                        "username": username,
                        "password_hash": hashed,
                        "disabled": False,
                        "created_at": now(),
                    }
                )
            except DuplicateError:
                raise ApiError(
                    "duplicate_username", "A user with this username already exists", 409
                ) from None
            row = await uow.partner.user_by_id(user_id)
            await uow.commit()
        assert row is not None
        return row

    async def disable_user(self, account_id: uuid.UUID, username: str) -> tuple[AnyRow, int]:
        async with self._db.unit_of_work() as uow:
            row = await uow.partner.owned_user(username, account_id)
            if row is None:
                raise not_found("user_not_found", "User not found")
            await uow.partner.disable_user(row.id)
            revoked = await uow.partner.revoke_tokens(partner_tokens.c.user_id == row.id, now())
            row = await uow.partner.user_by_id(row.id)
            await uow.commit()
        assert row is not None
        return row, revoked


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(client_id, client_secret) from `Authorization: Basic ...`, or None."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except ValueError:  # not base64 (binascii.Error), not ASCII, or not UTF-8
        return None
    client_id, sep, secret = decoded.partition(":")
    return (client_id, secret) if sep and client_id else None


class TokenService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def _issue(
        self, organization_id: uuid.UUID, *, client_id: str | None = None, user_id: uuid.UUID | None = None
    ) -> IssuedTokens:
        async with self._db.unit_of_work() as uow:
            issued = await self._add_tokens(uow, organization_id, client_id=client_id, user_id=user_id)
            await uow.commit()
        return issued

    @staticmethod
    async def _add_tokens(
        uow: UnitOfWork,
        organization_id: uuid.UUID,
        *,
        client_id: str | None = None,
        user_id: uuid.UUID | None = None,
    ) -> IssuedTokens:
        """A new access token, and for a user a refresh token, in the caller's transaction."""
        moment = now()
        access = new_token()
        rows = [
            {
                "token_hash": token_hash(access),
                "kind": "access",
                "organization_id": organization_id,
                "client_id": client_id,
                "user_id": user_id,
                "expires_at": moment + ACCESS_TOKEN_LIFETIME,
                "created_at": moment,
            }
        ]
        refresh = None
        if user_id is not None:
            refresh = new_token()
            rows.append({**rows[0], "token_hash": token_hash(refresh), "kind": "refresh"})
            rows[1]["expires_at"] = moment + REFRESH_TOKEN_LIFETIME
        await uow.partner.add_tokens(rows)
        return IssuedTokens(access, int(ACCESS_TOKEN_LIFETIME.total_seconds()), refresh)

    async def password_grant(self, username: str, password: str) -> IssuedTokens:
        async with self._db.unit_of_work(write=False) as uow:
            user = await uow.partner.user(username)
        stored = user.password_hash if user is not None else DUMMY_PASSWORD_HASH
        matches = await asyncio.to_thread(check_password, password, stored)
        if user is None or not matches or user.disabled:
            raise invalid_credentials()
        return await self._issue(user.organization_id, user_id=user.id)

    async def refresh_grant(self, refresh_token: str) -> IssuedTokens:
        """Spends the refresh token and issues the next pair in one transaction: either
        both happen or neither (a failure leaves the old refresh token usable)."""
        async with self._db.unit_of_work() as uow:
            spent = await uow.partner.use_refresh_token(token_hash(refresh_token), now())
            user = await uow.partner.user_by_id(spent.user_id) if spent and spent.user_id else None
            if spent is None or user is None or user.disabled:
                raise invalid_credentials()
            issued = await self._add_tokens(uow, user.organization_id, user_id=user.id)
            await uow.commit()
        return issued

    async def client_credentials(self, authorization: str | None) -> IssuedTokens:
        credentials = basic_credentials(authorization)
        if credentials is None:
            raise invalid_client()
        client_id, secret = credentials
        async with self._db.unit_of_work(write=False) as uow:
            client = await uow.partner.client(client_id)
        if (
            client is None
            or client.disabled
            or not hmac.compare_digest(client.secret_hash, token_hash(secret))
        ):
            raise invalid_client()
        return await self._issue(client.organization_id, client_id=client.client_id)

    async def authenticate(self, header: str | None) -> PartnerCaller:
        """A live access token from `Authorization: Bearer ...` (scheme in any case)."""
        scheme, _, token = (header or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise partner_unauthenticated()
        async with self._db.unit_of_work(write=False) as uow:
            row = await uow.partner.access_token(token_hash(token), now())
        if row is None:
            raise partner_unauthenticated()
        return PartnerCaller(row.organization_id)

    async def revoke(
        self, account_id: uuid.UUID, *, token: str = "", client_id: str = "", username: str = ""
    ) -> int:
        """Revokes tokens of the caller's organizations; how many were live."""
        async with self._db.unit_of_work() as uow:
            if token:
                condition = partner_tokens.c.token_hash == token_hash(token)
                owned = await uow.partner.token_owner(token_hash(token), account_id)
                if not owned:
                    return 0
            elif client_id:
                if await uow.partner.owned_client(client_id, account_id) is None:
                    raise not_found("client_not_found", "Client not found")
                condition = partner_tokens.c.client_id == client_id
            elif username:
                user = await uow.partner.owned_user(username, account_id)
                if user is None:
                    raise not_found("user_not_found", "User not found")
                condition = partner_tokens.c.user_id == user.id
            else:
                raise field_error("target", "Field required: one of token, client_id or username")
            revoked = await uow.partner.revoke_tokens(condition, now())
            await uow.commit()
        return revoked
