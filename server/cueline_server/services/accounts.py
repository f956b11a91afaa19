"""Accounts: registration, API-key authentication, the account summary."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cueline_server.config import Settings
from cueline_server.errors import ApiError, field_error, invalid_api_key, key_rotated
from cueline_server.services.callbacks import CallbackPolicy
from cueline_server.services.identifiers import (
    hash_api_key,
    looks_like_api_key,
    new_api_key,
    new_webhook_secret,
)
from cueline_server.store.database import Database
from cueline_server.store.repositories import AnyRow, DuplicateError

KEY_ROTATION_GRACE = dt.timedelta(hours=24)


@dataclass(frozen=True)
class Caller:
    account_id: uuid.UUID
    rate_limit_per_minute: int


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def month_start(moment: dt.datetime) -> dt.datetime:
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


class Authenticator:
    """Resolves `Authorization: Bearer cue_sk_...` to an account.

    Verified keys are remembered for `auth_cache_seconds`, which keeps the
    database off the hot path. When an entry expires, the calls that miss it
    together share one look-up instead of each reading the account (64 callers
    on one key would otherwise queue 64 reads for the pool at once). `forget`
    drops an account's entries at once when its key is rotated on this process;
    a look-up already under way then neither caches what it read nor serves
    later calls."""

    def __init__(self, db: Database, cache_seconds: float) -> None:
        self._db = db
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[Caller, float]] = {}
        self._lookups: dict[str, asyncio.Future[Caller]] = {}
        self._generation = 0  # moves on with every `forget`

    async def authenticate(self, header: str | None) -> Caller:
        if not header:
            raise invalid_api_key("Missing or invalid Authorization header")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise invalid_api_key("Missing or invalid Authorization header")
        if not token.startswith("cue_sk_") or not looks_like_api_key(token):
            raise invalid_api_key()
        key_hash = hash_api_key(token)
        cached = self._cache.get(key_hash)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        lookup = self._lookups.get(key_hash)
        if lookup is None:
            lookup = self._lookups[key_hash] = asyncio.ensure_future(self._look_up(key_hash))
            lookup.add_done_callback(lambda done: self._finished(key_hash, done))
        # Shielded: a caller that goes away does not cancel the others' look-up.
        return await asyncio.shield(lookup)

    async def _look_up(self, key_hash: str) -> Caller:
        generation = self._generation
        async with self._db.unit_of_work(write=False) as uow:
            row = await uow.accounts.by_key_hash(key_hash)
            if row is None:
                rotated_at = await uow.accounts.rotated_at_for_previous_key(key_hash)
                if rotated_at is not None and now() - rotated_at < KEY_ROTATION_GRACE:
                    raise key_rotated()
                raise invalid_api_key()
        caller = Caller(row.id, row.rate_limit_per_minute)
        if self._cache_seconds > 0 and generation == self._generation:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[key_hash] = (caller, time.monotonic() + self._cache_seconds)
        return caller

    def _finished(self, key_hash: str, lookup: asyncio.Future[Caller]) -> None:
        if self._lookups.get(key_hash) is lookup:
            del self._lookups[key_hash]
        if not lookup.cancelled():
            lookup.exception()  # retrieved here too, in case every caller went away

    def forget(self, account_id: uuid.UUID) -> None:
        self._generation += 1
        self._lookups.clear()  # later calls read the account afresh
        for key, (caller, _) in list(self._cache.items()):
            if caller.account_id == account_id:
                del self._cache[key]


@dataclass(frozen=True)
class Registration:
    api_key: str
    email: str


@dataclass(frozen=True)
class AccountSummary:
    account: AnyRow
    active_cues: int
    executions_this_month: int


@dataclass(frozen=True)
class Usage:
    """This UTC month against the account's limits (the contract's USAGE shape)."""

    plan: str
    period_start: dt.datetime
    period_end: dt.datetime
    days_remaining: int
    cues: dict[str, Any]
    executions: dict[str, Any]
    outcomes: dict[str, int]
    rate_limit: dict[str, int]


def _percent(used: int, limit: int) -> float:
    return round(100 * used / limit, 1) if limit else 0.0


def normalize_email(email: str) -> str:
    value = email.strip()
    local, at, domain = value.rpartition("@")
    if not at or not local or "." not in domain or any(c.isspace() for c in value):
        raise field_error("email", "value is not a valid email address")
    return value


class AccountService:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        authenticator: Authenticator | None = None,
        *,
        rate_usage: Callable[[uuid.UUID], int] | None = None,
    ) -> None:
        self._db = db
        self._settings = settings
        self._authenticator = authenticator or Authenticator(db, 0)
        # REST requests an account made in the current rate-limit window.
        self._rate_usage = rate_usage
        self._callbacks = CallbackPolicy(settings.allow_private_callbacks, settings.allow_http_callbacks)

    async def register(self, email: str) -> Registration:
        if not self._settings.allow_register:
            raise ApiError("not_found", "Not found", 404)
        email = normalize_email(email)
        key = new_api_key()
        moment = now()
        async with self._db.unit_of_work() as uow:
            if await uow.accounts.email_taken(email.lower()):
                raise _duplicate_email()
            try:
                await uow.accounts.add(
                    {
                        "id": uuid.uuid4(),
                        "email": email,
                        "email_key": email.lower(),
                        "api_key_hash": hash_api_key(key),
                        "api_key_prefix": key[:12],
                        "webhook_secret": new_webhook_secret(),
                        "plan": "free",
                        "active_cue_limit": self._settings.default_active_cue_limit,
                        "monthly_execution_limit": self._settings.default_monthly_execution_limit,
                        "rate_limit_per_minute": self._settings.default_rate_limit_per_minute,
                        "created_at": moment,
                        "updated_at": moment,
                    }
                )
            except DuplicateError:
                raise _duplicate_email() from None
            await uow.commit()
        return Registration(key, email)

    async def update(self, caller: Caller, email: str | None, alert_webhook_url: str | None) -> AnyRow:
        """Change the email or the alert webhook URL ("" clears it)."""
        if email is None and alert_webhook_url is None:
            raise ApiError("no_fields", "Provide email or alert_webhook_url", 422)
        values: dict[str, Any] = {"updated_at": now()}
        if email is not None:
            email = normalize_email(email)
            values.update(email=email, email_key=email.lower())
        if alert_webhook_url:
            try:
                await self._callbacks.check(alert_webhook_url)
            except ApiError as error:
                raise ApiError("invalid_alert_webhook_url", error.message, 400) from None
        if alert_webhook_url is not None:
            values["alert_webhook_url"] = alert_webhook_url or None
        async with self._db.unit_of_work() as uow:
            if email is not None and await uow.accounts.email_taken(email.lower(), besides=caller.account_id):
                raise _duplicate_email()
            await uow.accounts.update(caller.account_id, values)
            account = await uow.accounts.get(caller.account_id)
            assert account is not None
            await uow.commit()
        return account

    async def regenerate_key(self, caller: Caller, confirmed: bool) -> str:
        """A new key; the old one answers key_rotated for 24 h."""
        _require_confirmation(confirmed)
        key = new_api_key()
        moment = now()
        async with self._db.unit_of_work() as uow:
            account = await uow.accounts.get(caller.account_id)
            assert account is not None
            await uow.accounts.update(
                caller.account_id,
                {
                    "api_key_hash": hash_api_key(key),
                    "api_key_prefix": key[:12],
                    "previous_key_hash": account.api_key_hash,
                    "key_rotated_at": moment,
                    "updated_at": moment,
                },
            )
            await uow.commit()
        self._authenticator.forget(caller.account_id)
        return key

    async def webhook_secret(self, caller: Caller) -> str:
        async with self._db.unit_of_work(write=False) as uow:
            secret = await uow.accounts.webhook_secret(caller.account_id)
        if not secret:
            raise ApiError("no_webhook_secret", "No webhook secret is set", 404)
        return secret

    async def regenerate_webhook_secret(self, caller: Caller, confirmed: bool) -> str:
        _require_confirmation(confirmed)
        secret = new_webhook_secret()
        async with self._db.unit_of_work() as uow:
            await uow.accounts.update(caller.account_id, {"webhook_secret": secret, "updated_at": now()})
            await uow.commit()
        return secret

    async def summary(self, caller: Caller) -> AccountSummary:
        # A read transaction, not the reader: the month's count grows with the
        # account's traffic, and the reader's connections serve the hot statements.
        async with self._db.unit_of_work(write=False) as uow:
            account = await uow.accounts.standing(caller.account_id, month_start(now()), outcomes=False)
        if account is None:
            raise invalid_api_key()
        return AccountSummary(account, account.live_cues, account.executions_since)

    async def usage(self, caller: Caller) -> Usage:
        moment = now()
        start = month_start(moment)
        end = (start + dt.timedelta(days=32)).replace(day=1)
        async with self._db.unit_of_work(write=False) as uow:  # not the reader: see summary
            account = await uow.accounts.standing(caller.account_id, start, outcomes=True)
        if account is None:
            raise invalid_api_key()
        live, used = account.live_cues, account.executions_since
        cue_limit, run_limit = account.active_cue_limit, account.monthly_execution_limit
        elapsed_days = max((moment - start).total_seconds() / 86400, 1 / 24)
        projected = round(used / elapsed_days * (end - start).days)
        return Usage(
            plan=account.plan,
            period_start=start,
            period_end=end,
            days_remaining=max((end - moment).days, 0),
            cues={
                "used": live,
                "active": account.active_cues,
                "limit": cue_limit,
                "remaining": max(cue_limit - live, 0),
                "percent_used": _percent(live, cue_limit),
            },
            executions={
                "used": used,
                "limit": run_limit,
                "remaining": max(run_limit - used, 0),
                "percent_used": _percent(used, run_limit),
                "percentage": _percent(used, run_limit),
                "projected_month_end": projected,
                "will_exceed_limit": projected > run_limit,
            },
            outcomes={
                "reported": account.reported,
                "succeeded": account.succeeded,
                "failed": account.failed,
            },
            rate_limit={
                "limit": account.rate_limit_per_minute,
                "requests_per_minute": account.rate_limit_per_minute,
                "current_usage": self._rate_usage(caller.account_id) if self._rate_usage else 0,
            },
        )


def _require_confirmation(confirmed: bool) -> None:
    if not confirmed:
        raise ApiError(
            "confirmation_required",
            "This action is destructive: send the header X-Confirm-Destructive: true",
            400,
        )


def _duplicate_email() -> ApiError:
    return ApiError("duplicate_email", "An account with this email already exists", 409)
