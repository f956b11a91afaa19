"""Cues: creation and update rules, listing, deletion and manual firing.

A cue arrives as a CueDraft: the values the caller gave, keyed by their path
in the Cue message (`retry.max_attempts`), so the rules below read the same
for gRPC and REST and for create (what was set) and update (what the mask
names). Checks run in the documented order: schema, duplicate name, cue
limit, callback URL, payload, timezone, schedule.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cueline_server.config import Settings
from cueline_server.errors import ApiError, cue_not_found, field_error, idempotency_key_conflict
from cueline_server.services.accounts import Caller, now
from cueline_server.services.callbacks import CallbackPolicy, split_url
from cueline_server.services.identifiers import is_cue_id, new_cue_id
from cueline_server.services.schedules import check_cron, invalid_schedule, next_cron_time, zone
from cueline_server.store.batching import Coalescer
from cueline_server.store.database import Database, Repositories
from cueline_server.store.repositories import AnyRow, DuplicateError
from cueline_server.store.tables import LIVE_CUE_STATUSES

MAX_PAYLOAD_BYTES = 1_048_576
FIRE_KEY_TTL = dt.timedelta(hours=24)
MAX_HEADER_BYTES = 8192
METHODS = ("POST", "GET", "PUT", "PATCH")
TERMINAL_STATUSES = ("completed", "failed")
NO_WORKER_WARNING = "No active workers found. Start a cueapi-worker to process this cue."
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Visible ASCII, with spaces and tabs inside only (RFC 9110 field-value, without obsolete bytes).
_HEADER_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x20\x09\x21-\x7e]*[\x21-\x7e])?)?")

DEFAULTS: dict[str, Any] = {
    "transport": "webhook",
    "callback_method": "POST",
    "callback_headers": "{}",
    "payload": "{}",
    "retry_max_attempts": 3,
    "retry_backoff_minutes": "[1,5,15]",
    "on_failure_email": True,
    "on_failure_webhook": None,
    "on_failure_pause": False,
    "verification_mode": None,
    "timeout_seconds": 30,
    "outcome_deadline_seconds": 300,
    "alert_consecutive_failures": 3,
    "alert_missed_window_multiplier": 2,
    "catch_up": "run_once_if_missed",
}

# Draft paths whose value maps 1:1 onto a column.
_SIMPLE_COLUMNS = {
    "description": "description",
    "retry.max_attempts": "retry_max_attempts",
    "on_failure.email": "on_failure_email",
    "on_failure.pause": "on_failure_pause",
    "on_failure.webhook": "on_failure_webhook",
    "verification.mode": "verification_mode",
    "delivery.timeout_seconds": "timeout_seconds",
    "delivery.outcome_deadline_seconds": "outcome_deadline_seconds",
    "alerts.consecutive_failures": "alert_consecutive_failures",
    "alerts.missed_window_multiplier": "alert_missed_window_multiplier",
    "catch_up": "catch_up",
}

CueDraft = Mapping[str, Any]
"""Values the caller gave, by Cue message path; None means an explicit null."""


@dataclass(frozen=True)
class CueView:
    row: AnyRow
    warning: str | None


@dataclass(frozen=True)
class CuePage:
    cues: Sequence[CueView]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True)
class Fired:
    execution_id: str
    cue_id: str
    scheduled_for: dt.datetime


@dataclass(frozen=True)
class NewWork:
    """An execution just committed and due now: who may take it."""

    account_id: uuid.UUID
    transport: str
    task: str | None

    @classmethod
    def of(cls, execution: Mapping[str, Any]) -> NewWork:
        return cls(execution["account_id"], execution["transport"], execution["task"])


WorkCreated = Callable[[Sequence[NewWork] | None], None]
"""Called after new executions are committed: those due now, or None when
what became claimable or due is not known (every waiter looks again)."""


@dataclass(frozen=True)
class CueDetail:
    cue: CueView
    executions: Sequence[AnyRow]
    total: int
    limit: int
    offset: int


def check_payload(text: str | None, field: str) -> str:
    """A JSON object under 1 MiB (compact UTF-8) without NUL characters."""
    if text is None:
        return "{}"
    value = json.loads(text)
    if not isinstance(value, dict):
        raise field_error(field, "Input should be a valid dictionary")
    if len(text.encode()) > MAX_PAYLOAD_BYTES:
        raise ApiError("invalid_payload_size", "Payload must be under 1MB", 400)
    if _has_nul(value):
        raise ApiError("invalid_payload", "Payload must not contain NUL characters", 400)
    return text


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def payload_task(payload: str) -> str | None:
    task = json.loads(payload).get("task")
    return task if isinstance(task, str) and len(task) <= 255 else None


def _check_url(url: str, field: str) -> None:
    parts = split_url(url)
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise field_error(field, "URL must be an absolute http:// or https:// URL")


def _check_headers(headers: Mapping[str, str]) -> str:
    size = 0
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise field_error(f"callback.headers.{name}", "Header name must be an HTTP token")
        if name.lower().startswith("x-cueapi-"):
            raise field_error(f"callback.headers.{name}", "X-CueAPI-* headers are reserved")
        if not _HEADER_VALUE.fullmatch(value):  # what an HTTP/1.1 request can carry (no CR, LF)
            raise field_error(
                f"callback.headers.{name}",
                "Header value must be printable ASCII, without spaces or tabs at either end",
            )
        size += len(name.encode()) + len(value.encode())
    if size > MAX_HEADER_BYTES:
        raise field_error("callback.headers", f"Headers must total at most {MAX_HEADER_BYTES} bytes")
    return json.dumps(dict(headers), separators=(",", ":"), ensure_ascii=False)


def _method(value: str | None) -> str:
    method = (value or "POST").upper()
    if method not in METHODS:
        raise field_error("callback.method", "Input should be 'POST', 'GET', 'PUT' or 'PATCH'")
    return method


def _schedule_columns(draft: CueDraft, current_timezone: str | None, moment: dt.datetime) -> dict[str, Any]:
    """Timezone (422) first, then the schedule itself (400)."""
    timezone = draft.get("schedule.timezone") or current_timezone or "UTC"
    zone(timezone)
    kind = draft.get("schedule.type")
    if kind == "recurring":
        cron = check_cron(draft.get("schedule.cron"))
        return {"schedule_type": kind, "cron": cron, "at": None, "timezone": timezone}
    if kind == "once":
        at: dt.datetime | None = draft.get("schedule.at")
        if at is None or at <= moment:
            raise invalid_schedule("Scheduled time must be in the future")
        return {"schedule_type": kind, "cron": None, "at": at, "timezone": timezone}
    raise invalid_schedule("Schedule type must be 'once' or 'recurring'")


def next_run_for(columns: Mapping[str, Any], moment: dt.datetime) -> dt.datetime | None:
    if columns["status"] != "active":
        return None
    if columns["schedule_type"] == "once":
        at: dt.datetime = columns["at"]
        return at
    following = next_cron_time(columns["cron"], columns["timezone"], moment)
    if following is None:
        raise invalid_schedule(f"Cron expression '{columns['cron']}' has no time after now")
    return following


class CueService:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        schedule_changed: Callable[[], None] = lambda: None,
        work_created: WorkCreated = lambda created: None,
        deleted: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = db
        self._settings = settings
        self._schedule_changed = schedule_changed
        self._work_created = work_created
        self._deleted = deleted  # after a cue and its executions are deleted
        self._callbacks = CallbackPolicy(settings.allow_private_callbacks, settings.allow_http_callbacks)
        # SQLite has one writer: concurrent fires share its transactions (group
        # commit). PostgreSQL writes each fire as one autocommitted statement.
        self._fires: Coalescer[tuple[Mapping[str, Any], dt.datetime], None] | None = (
            Coalescer(self._write_fires) if db.backend == "sqlite" else None
        )

    async def _write_fires(self, fires: Sequence[tuple[Mapping[str, Any], dt.datetime]]) -> list[None]:
        async with self._db.single_statement() as repos:
            await repos.executions.add_fired(fires)
        return [None] * len(fires)

    async def _warning(self, repos: Repositories, caller: Caller, transport: str) -> str | None:
        if transport != "worker":
            return None
        since = now() - dt.timedelta(seconds=self._settings.worker_heartbeat_timeout_seconds)
        return None if await repos.workers.any_alive(caller.account_id, since) else NO_WORKER_WARNING

    async def create(self, caller: Caller, draft: CueDraft) -> CueView:
        moment = now()
        transport = draft.get("transport") or "webhook"
        if "callback.transport" in draft:
            raise field_error(
                "callback.transport", "transport must be specified at the top level, not inside callback"
            )
        url = draft.get("callback.url")
        if transport == "webhook" and url is None:
            raise field_error("callback.url", "callback.url is required for webhook transport")
        if url is not None:
            _check_url(url, "callback.url")
        columns: dict[str, Any] = dict(DEFAULTS)
        columns.update(
            {
                "transport": transport,
                "callback_url": url,
                "callback_method": _method(draft.get("callback.method")),
                "callback_headers": _check_headers(draft.get("callback.headers") or {}),
            }
        )
        if draft.get("retry.backoff_minutes"):
            columns["retry_backoff_minutes"] = json.dumps(list(draft["retry.backoff_minutes"]))
        for path, column in _SIMPLE_COLUMNS.items():
            if draft.get(path) is not None:
                columns[column] = draft[path]
        async with self._db.unit_of_work() as uow:
            name: str = draft["name"]
            if await uow.cues.name_taken(caller.account_id, name):
                raise _duplicate_name(name)
            account = await uow.accounts.get(caller.account_id)
            assert account is not None
            if await uow.cues.count(caller.account_id, LIVE_CUE_STATUSES) >= account.active_cue_limit:
                raise ApiError(
                    "cue_limit_exceeded", f"Active cue limit of {account.active_cue_limit} reached", 403
                )
            if transport == "webhook" and url is not None:
                await self._callbacks.check(url)
            columns["payload"] = check_payload(draft.get("payload"), "payload")
            columns.update(_schedule_columns(draft, None, moment))
            if columns["on_failure_webhook"] is not None:
                await self._callbacks.check(columns["on_failure_webhook"], "on_failure.webhook")
            columns.update(
                id=new_cue_id(),
                account_id=caller.account_id,
                name=name,
                status="active",
                run_count=0,
                fired_count=0,
                last_run=None,
                created_at=moment,
                updated_at=moment,
            )
            columns["next_run"] = next_run_for(columns, moment)
            try:
                await uow.cues.add(columns)
            except DuplicateError:
                raise _duplicate_name(name) from None
            row = await uow.cues.get(caller.account_id, columns["id"])
            assert row is not None
            warning = await self._warning(uow, caller, transport)
            await uow.commit()
        self._schedule_changed()
        return CueView(row, warning)

    async def page(
        self, caller: Caller, status: str | None, limit: int | None, offset: int | None
    ) -> CuePage:
        limit = 50 if limit is None else limit
        offset = offset or 0
        async with self._db.unit_of_work(write=False) as uow:
            rows, total = await uow.cues.page(caller.account_id, status, limit, offset)
            worker_warning = None
            if any(r.transport == "worker" for r in rows):
                worker_warning = await self._warning(uow, caller, "worker")
        views = [CueView(r, worker_warning if r.transport == "worker" else None) for r in rows]
        return CuePage(views, total, limit, offset)

    async def detail(self, caller: Caller, cue_id: str, limit: int | None, offset: int | None) -> CueDetail:
        limit = 10 if limit is None else limit
        offset = offset or 0
        if not is_cue_id(cue_id):
            raise cue_not_found()
        async with self._db.unit_of_work(write=False) as uow:
            row = await uow.cues.get(caller.account_id, cue_id)
            if row is None:
                raise cue_not_found()
            executions, total, _ = await uow.executions.page(
                caller.account_id, cue_id=cue_id, limit=limit, offset=offset
            )
            warning = await self._warning(uow, caller, row.transport)
        return CueDetail(CueView(row, warning), executions, total, limit, offset)

    async def update(self, caller: Caller, cue_id: str, draft: CueDraft) -> CueView:
        if not is_cue_id(cue_id):
            raise cue_not_found()
        moment = now()
        async with self._db.unit_of_work() as uow:
            current = await uow.cues.get(caller.account_id, cue_id)
            if current is None:
                raise cue_not_found()
            changes = await self._changes(uow, caller, current, draft, moment)
            row = current
            if changes:
                changes["updated_at"] = moment
                try:
                    updated = await uow.cues.update(caller.account_id, cue_id, changes)
                except DuplicateError:
                    raise _duplicate_name(draft["name"]) from None
                if updated is None:  # deleted since it was read
                    raise cue_not_found()
                row = updated
            warning = await self._warning(uow, caller, row.transport)
            await uow.commit()
        if "next_run" in changes:
            self._schedule_changed()
        return CueView(row, warning)

    async def _changes(
        self, repos: Repositories, caller: Caller, current: AnyRow, draft: CueDraft, moment: dt.datetime
    ) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        status = draft.get("status")
        if "status" in draft and status not in LIVE_CUE_STATUSES:
            raise field_error("status", "Input should be 'active' or 'paused'")
        if "callback.transport" in draft:
            raise field_error("callback.transport", "Extra inputs are not permitted")
        if "callback.url" in draft:
            url = draft["callback.url"]
            if url is None and current.transport == "webhook":
                raise field_error("callback.url", "callback.url is required for webhook transport")
            if url is not None:
                _check_url(url, "callback.url")
                if current.transport == "webhook":
                    await self._callbacks.check(url)
            changes["callback_url"] = url
        if "callback.method" in draft:
            changes["callback_method"] = _method(draft["callback.method"])
        if "callback.headers" in draft:
            changes["callback_headers"] = _check_headers(draft["callback.headers"] or {})
        if "retry.backoff_minutes" in draft:
            changes["retry_backoff_minutes"] = json.dumps(list(draft["retry.backoff_minutes"] or []))
        for path, column in _SIMPLE_COLUMNS.items():
            if path in draft and (draft[path] is not None or column in ("description", "on_failure_webhook")):
                changes[column] = draft[path]
        if "name" in draft and draft["name"] != current.name:
            if await repos.cues.name_taken(caller.account_id, draft["name"], besides=current.id):
                raise _duplicate_name(draft["name"])
            changes["name"] = draft["name"]
        if "payload" in draft:
            changes["payload"] = check_payload(draft["payload"], "payload")
        rescheduled = any(path.startswith("schedule") for path in draft)
        if rescheduled:
            changes.update(_schedule_columns(draft, current.timezone, moment))
        if changes.get("on_failure_webhook") is not None:
            await self._callbacks.check(changes["on_failure_webhook"], "on_failure.webhook")
        if "status" in draft and current.status in TERMINAL_STATUSES:
            raise ApiError("invalid_state", f"Cannot change status of a {current.status} cue", 409)
        new_status = status if "status" in draft else current.status
        if current.status not in TERMINAL_STATUSES and (rescheduled or new_status != current.status):
            merged = {**current._mapping, **changes, "status": new_status}
            changes["status"] = new_status
            changes["next_run"] = next_run_for(merged, moment)
        return changes

    async def delete(self, caller: Caller, cue_id: str) -> None:
        if not is_cue_id(cue_id):
            raise cue_not_found()
        async with self._db.unit_of_work() as uow:
            if not await uow.cues.delete(caller.account_id, cue_id):
                raise cue_not_found()
            await uow.commit()
        self._deleted()

    async def fire(
        self,
        caller: Caller,
        cue_id: str,
        *,
        send_at: dt.datetime | None,
        payload_override: str | None,
        replace: bool,
        idempotency_key: str | None = None,
    ) -> Fired:
        """Creates a manual_fire execution with the payload snapshot. A repeat
        with the same idempotency key and body within 24 h returns the first
        result and creates nothing; the same key with another body is refused."""
        if not is_cue_id(cue_id):
            raise cue_not_found()
        override = check_payload(payload_override, "payload_override") if payload_override else None
        request_hash = hashlib.sha256(
            json.dumps(
                {
                    "send_at": send_at.isoformat() if send_at else None,
                    "payload_override": json.loads(override) if override else None,
                    "merge_strategy": "replace" if replace and override else "merge",
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()
        for _ in range(2):  # a second round only after losing a race for the key
            try:
                fired, work = await self._fire_once(
                    caller, cue_id, send_at, override, replace, idempotency_key, request_hash
                )
            except DuplicateError:
                continue
            if work is not None and fired.scheduled_for <= now():
                # Committed and due now: wake the dispatcher or a waiting worker
                # instead of leaving the execution to their next poll.
                self._work_created([work])
            return fired
        raise idempotency_key_conflict()

    async def _fire_once(
        self,
        caller: Caller,
        cue_id: str,
        send_at: dt.datetime | None,
        override: str | None,
        replace: bool,
        key: str | None,
        request_hash: str,
    ) -> tuple[Fired, NewWork | None]:
        """The execution, and what was created (None for a repeat)."""
        if key is None:
            return await self._fire_without_key(caller, cue_id, send_at, override, replace)
        moment = now()
        async with self._db.unit_of_work() as uow:
            cue = await uow.cues.get(caller.account_id, cue_id)
            if cue is None:
                raise cue_not_found()
            earlier = await uow.fire_keys.get(cue_id, key)
            if earlier is not None and moment - earlier.created_at < FIRE_KEY_TTL:
                if earlier.request_hash != request_hash:
                    raise idempotency_key_conflict()
                return Fired(str(earlier.execution_id), cue_id, earlier.scheduled_for), None
            if earlier is not None:
                await uow.fire_keys.forget(cue_id, key)
            values = self._execution(cue, moment, send_at, override, replace)
            await uow.executions.add(values)
            await uow.fire_keys.add(
                {
                    "cue_id": cue_id,
                    "key": key,
                    "request_hash": request_hash,
                    "execution_id": values["id"],
                    "scheduled_for": values["scheduled_for"],
                    "created_at": moment,
                }
            )
            # Last: the cue row stays locked from here to the commit.
            await uow.cues.count_fired(cue.id, 1, moment)
            await uow.commit()
        return Fired(str(values["id"]), cue_id, values["scheduled_for"]), NewWork.of(values)

    async def _fire_without_key(
        self, caller: Caller, cue_id: str, send_at: dt.datetime | None, override: str | None, replace: bool
    ) -> tuple[Fired, NewWork]:
        """Read the cue, then write the execution and the cue's count in one
        statement (PostgreSQL) or a transaction shared with concurrent fires
        (SQLite). A cue deleted
        in between refuses the insert (DuplicateError), and the caller's second
        round finds no cue."""
        moment = now()
        async with self._db.reader() as repos:
            cue = await repos.cues.get(caller.account_id, cue_id)
        if cue is None:
            raise cue_not_found()
        values = self._execution(cue, moment, send_at, override, replace)
        if self._fires is not None:
            await self._fires.submit((values, moment))
        else:
            await self._write_fires([(values, moment)])
        return Fired(str(values["id"]), cue_id, values["scheduled_for"]), NewWork.of(values)

    @staticmethod
    def _execution(
        cue: AnyRow, moment: dt.datetime, send_at: dt.datetime | None, override: str | None, replace: bool
    ) -> dict[str, Any]:
        payload = cue.payload
        if override is not None:
            payload = override if replace else _merge(cue.payload, override)
            check_payload(payload, "payload_override")
        return new_execution(
            cue, triggered_by="manual_fire", payload=payload, scheduled_for=max(send_at or moment, moment)
        )


def _merge(base: str, override: str) -> str:
    merged = json.loads(base)
    merged.update(json.loads(override))
    return json.dumps(merged, separators=(",", ":"), ensure_ascii=False)


def new_execution(
    cue: AnyRow, *, triggered_by: str, payload: str, scheduled_for: dt.datetime, at: dt.datetime | None = None
) -> dict[str, Any]:
    """A new execution's row, created `at` (default now)."""
    moment = at or now()
    return {
        "id": uuid.uuid4(),
        "account_id": cue.account_id,
        "cue_id": cue.id,
        "transport": cue.transport,
        "scheduled_for": scheduled_for,
        "status": "pending",
        "triggered_by": triggered_by,
        "payload": payload,
        "task": payload_task(payload),
        "attempts": 0,
        "available_at": scheduled_for if cue.transport == "worker" else None,
        "created_at": moment,
        "updated_at": moment,
    }


def _duplicate_name(name: str) -> ApiError:
    return ApiError("duplicate_cue_name", f"A cue named '{name}' already exists", 409)
