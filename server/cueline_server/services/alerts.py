"""Alerts (contract §5.9): verification_failed, consecutive_failures and
outcome_timeout. Each is stored after the change that caused it has committed
(it never fails that request), deduplicated per (account, type, execution)
within 5 minutes, and POSTed to the account's alert webhook, signed like a
webhook delivery.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cueline_server.errors import ApiError
from cueline_server.services.accounts import Caller, now
from cueline_server.services.identifiers import parse_uuid
from cueline_server.store.database import Database
from cueline_server.store.repositories import AnyRow

log = logging.getLogger("cueline.alerts")

DEDUPE_WINDOW = dt.timedelta(minutes=5)
TYPES = ("verification_failed", "consecutive_failures", "outcome_timeout")
ALIASES = {"consecutive_failure": "consecutive_failures"}

Deliver = Callable[[AnyRow, str, str], Awaitable[None]]
"""Sends a stored alert to a URL, signed with the account's secret (the
dispatcher's SSRF-checked sender)."""


@dataclass(frozen=True)
class AlertPage:
    alerts: Sequence[AnyRow]
    total: int
    limit: int
    offset: int


def alert_not_found() -> ApiError:
    return ApiError("alert_not_found", "Alert not found", 404)


class AlertService:
    def __init__(self, db: Database, deliver: Deliver | None = None) -> None:
        self._db = db
        self.deliver = deliver
        self._tasks: set[asyncio.Task[None]] = set()

    # --- raising (in the background, after the cause committed) ---------------------------------

    def _spawn(self, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception:
                log.exception("raising an alert failed")

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def verification_failed(self, execution_ids: Sequence[uuid.UUID]) -> None:
        for execution_id in execution_ids:
            self._spawn(
                self._raise_for(execution_id, "verification_failed", "warning", "Outcome failed verification")
            )

    def outcome_timeouts(self, execution_ids: Sequence[uuid.UUID]) -> None:
        for execution_id in execution_ids:
            self._spawn(
                self._raise_for(
                    execution_id, "outcome_timeout", "warning", "No outcome reported before the deadline"
                )
            )

    def failures(self, execution_ids: Sequence[uuid.UUID]) -> None:
        """A new failure (a failed or missed execution, or a failure report): check the streak."""
        for execution_id in execution_ids:
            self._spawn(self._check_streak(execution_id))

    async def _check_streak(self, execution_id: uuid.UUID) -> None:
        async with self._db.unit_of_work(write=False) as uow:
            execution = await uow.deliveries.failure_notice(execution_id)
            if execution is None:
                return
            cue = await uow.cues.get(execution.account_id, execution.cue_id)
            if cue is None:
                return
            threshold = cue.alert_consecutive_failures
            # The streak as of this failure: later executions do not count.
            recent = await uow.alerts.recent_final(cue.id, execution.created_at, threshold)
        streak = 0
        for row in recent:
            failed = row.status in ("failed", "missed") or row.outcome_success is False
            if not failed:
                break
            streak += 1
        if streak >= threshold:
            await self._raise_for(
                execution_id,
                "consecutive_failures",
                "critical",
                f"{streak} consecutive failures of cue '{cue.name}'",
                {"consecutive_failures": streak, "threshold": threshold},
            )

    async def _raise_for(
        self,
        execution_id: uuid.UUID,
        alert_type: str,
        severity: str,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        moment = now()
        async with self._db.unit_of_work() as uow:
            execution = await uow.deliveries.failure_notice(execution_id)
            if execution is None:
                return
            if await uow.alerts.recently_raised(
                execution.account_id, alert_type, execution_id, moment - DEDUPE_WINDOW
            ):
                return
            alert_id = uuid.uuid4()
            await uow.alerts.add(
                {
                    "id": alert_id,
                    "account_id": execution.account_id,
                    "cue_id": execution.cue_id,
                    "execution_id": execution_id,
                    "alert_type": alert_type,
                    "severity": severity,
                    "message": message,
                    "metadata": json.dumps({"cue_name": execution.cue_name, **(details or {})}),
                    "acknowledged": False,
                    "created_at": moment,
                }
            )
            account = await uow.accounts.get(execution.account_id)
            alert = await uow.alerts.get(execution.account_id, alert_id)
            await uow.commit()
        if (
            self.deliver is not None
            and account is not None
            and account.alert_webhook_url
            and alert is not None
        ):
            await self.deliver(alert, account.alert_webhook_url, account.webhook_secret)

    # --- reading -------------------------------------------------------------------------------

    async def page(
        self,
        caller: Caller,
        *,
        alert_type: str | None,
        cue_id: str | None,
        acknowledged: bool | None,
        since: dt.datetime | None,
        limit: int | None,
        offset: int | None,
    ) -> AlertPage:
        if alert_type is not None:
            alert_type = ALIASES.get(alert_type, alert_type)
            if alert_type not in TYPES:
                raise ApiError("invalid_filter", f"Unknown alert_type '{alert_type}'", 400)
        limit = 20 if limit is None else limit
        offset = offset or 0
        async with self._db.unit_of_work(write=False) as uow:
            rows, total = await uow.alerts.page(
                caller.account_id,
                alert_type=alert_type,
                cue_id=cue_id,
                acknowledged=acknowledged,
                since=since,
                limit=limit,
                offset=offset,
            )
        return AlertPage(rows, total, limit, offset)

    async def acknowledge(self, caller: Caller, alert_id: str) -> AnyRow:
        parsed = parse_uuid(alert_id)
        if parsed is None:
            raise alert_not_found()
        async with self._db.unit_of_work() as uow:
            if await uow.alerts.get(caller.account_id, parsed) is None:
                raise alert_not_found()
            await uow.alerts.acknowledge(caller.account_id, parsed)
            row = await uow.alerts.get(caller.account_id, parsed)
            assert row is not None
            await uow.commit()
        return row
