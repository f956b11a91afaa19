"""Webhook delivery (contract §5.7, §5.8): the signed envelope, retries with
backoff, the response-body outcome, stale recovery, and on_failure.

Due webhook executions are taken in batches with SKIP LOCKED (so replicas
share them) and moved to `delivering` by the same statement, which also reads
the account's signing secret: just before sending, never queued with the
work. Each is then sent in its own task, at most `delivery_concurrency` at
once, so a slow receiver never holds up the scheduler or other deliveries.
The results of attempts that finish together are stored together: one
transaction for the batch (group commit). Delivery is at-least-once: an
attempt whose result could not be written (a crash) is retried after the
stale window.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11

from cueline_server.api.jsoncodec import format_timestamp, render
from cueline_server.config import Settings
from cueline_server.errors import ApiError
from cueline_server.outbound import HttpClient, Origin
from cueline_server.servicers.alerts import alert_message
from cueline_server.services.accounts import Caller, now
from cueline_server.services.callbacks import BlockedTarget, CallbackPolicy
from cueline_server.services.outcomes import OutcomeReport, OutcomeService, ReportRequest
from cueline_server.store.batching import Coalescer
from cueline_server.store.database import Database, Repositories
from cueline_server.store.repositories import AnyRow

log = logging.getLogger("cueline.dispatch")

BATCH = 100
RESPONSE_BODY_LIMIT = 2000
READ_LIMIT = 64 * 1024
NOTIFY_TIMEOUT = 10.0
_OUTCOME_FIELDS = ("result", "error", "external_id", "result_url", "result_ref", "result_type", "summary")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """X-CueAPI-Signature: v1= HMAC-SHA256 over "{timestamp}.{body}" with the full whsec_ secret."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def failure_message(status: int) -> str:
    if status == 404:
        return "Webhook endpoint not found (404)"
    if status == 408:
        return "Webhook endpoint timed out"
    if status == 500:
        return "Webhook endpoint returned server error (500)"
    if 400 <= status < 500:
        return f"Webhook endpoint rejected request ({status})"
    if status >= 500:
        return f"Webhook endpoint server error ({status})"
    return f"Webhook delivery failed ({status})"


@dataclass(frozen=True)
class Attempt:
    """What one HTTP attempt came to."""

    http_status: int | None
    body: str | None
    error: str | None

    @property
    def succeeded(self) -> bool:
        return self.error is None


class Sender:
    """Outbound HTTP to checked addresses only: resolve, check, connect to that address."""

    def __init__(self, policy: CallbackPolicy) -> None:
        self._policy = policy
        self._http = HttpClient()

    async def close(self) -> None:
        await self._http.close()

    async def send(
        self, method: str, url: str, body: bytes, headers: Mapping[str, str], seconds: float
    ) -> Attempt:
        """One attempt with a whole-request limit of `seconds`."""
        try:
            address = await self._policy.target(url)
        except BlockedTarget:
            return Attempt(None, None, "Callback URL resolved to blocked IP")
        except ConnectionError:
            return Attempt(None, None, "Could not connect to webhook endpoint")
        parts = urlsplit(url)
        https = parts.scheme == "https"
        try:
            origin = Origin(
                parts.scheme,
                str(address),
                parts.port or (443 if https else 80),
                parts.netloc.rsplit("@", 1)[-1],
                parts.hostname or "",
            )
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            async with asyncio.timeout(seconds):
                response = await self._http.request(
                    origin, method, target, headers, None if method == "GET" else body, READ_LIMIT
                )
        except TimeoutError:
            return Attempt(None, None, "Webhook endpoint timed out")
        except (OSError, h11.RemoteProtocolError):
            return Attempt(None, None, "Could not connect to webhook endpoint")
        except Exception as exc:  # anything else is reported, never raised into the loop
            return Attempt(None, None, str(exc)[:500] or type(exc).__name__)
        if not response.status:
            return Attempt(None, None, "Could not connect to webhook endpoint")
        if 200 <= response.status < 300:
            return Attempt(response.status, response.body.decode("utf-8", errors="replace"), None)
        return Attempt(response.status, None, failure_message(response.status))


def _signed_headers(secret: str, body: bytes, extra: Mapping[str, str]) -> dict[str, str]:
    timestamp = str(int(time.time()))
    return {
        "Content-Type": "application/json",
        "X-CueAPI-Signature": sign(secret, timestamp, body),
        "X-CueAPI-Timestamp": timestamp,
        **extra,
    }


@dataclass(frozen=True)
class _Finished:
    """A delivery attempt whose result is to be stored."""

    row: AnyRow
    attempt: Attempt


class Dispatcher:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        outcomes: OutcomeService,
        on_failed: Callable[[Sequence[uuid.UUID]], None] | None = None,
    ) -> None:
        self._db = db
        self._outcomes = outcomes
        self._on_failed = on_failed or self.notify_failed
        self._policy = CallbackPolicy(settings.allow_private_callbacks, settings.allow_http_callbacks)
        self._sender: Sender | None = None
        self._poll = settings.scheduler_poll_seconds
        self._stale = settings.webhook_stale_after_seconds
        self._slots = asyncio.Semaphore(settings.delivery_concurrency)
        self._capacity = settings.delivery_concurrency
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._notices: set[asyncio.Task[None]] = set()
        self._results: Coalescer[_Finished, bool] = Coalescer(self._store_results)

    def wake(self) -> None:
        """New work may be due now."""
        self._wake.set()

    @property
    def sender(self) -> Sender:
        if self._sender is None:
            self._sender = Sender(self._policy)
        return self._sender

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            # Cleared before looking, so work created during the look wakes the next one.
            self._wake.clear()
            taken = 0
            try:
                taken = await self._take_and_start()
            except Exception:
                log.exception("dispatch pass failed; retrying")
            if taken >= BATCH:
                continue
            waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stopping.wait())]
            await asyncio.wait(waits, timeout=self._poll, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()

    def notify_failed(self, execution_ids: Sequence[uuid.UUID]) -> None:
        """Send on_failure notices in the background (best effort, like the contract's no-retry rule)."""
        for execution_id in execution_ids:
            task = asyncio.create_task(notify_cue_failed(self._db, self.sender, execution_id))
            self._notices.add(task)
            task.add_done_callback(self._notices.discard)

    async def deliver_alert(self, alert: AnyRow, url: str, secret: str) -> None:
        """POST an alert to the account's alert webhook: signed, 10 s, no retries."""
        body = json.dumps(render(alert_message(alert)), sort_keys=True).encode()
        headers = _signed_headers(
            secret, body, {"X-CueAPI-Alert-Id": str(alert.id), "X-CueAPI-Alert-Type": alert.alert_type}
        )
        attempt = await self.sender.send("POST", url, body, headers, NOTIFY_TIMEOUT)
        if not attempt.succeeded:
            log.warning("alert webhook for %s failed: %s", alert.id, attempt.error)

    async def drain(self, grace: float) -> None:
        """Let deliveries under way finish (shutdown), then close the client."""
        pending = self._tasks | self._notices
        if pending:
            await asyncio.wait(pending, timeout=grace)
        if self._sender is not None:
            await self._sender.close()

    async def _take_and_start(self) -> int:
        free = self._capacity - len(self._tasks)
        if free <= 0:
            return 0
        async with self._db.single_statement() as repos:
            rows = await repos.deliveries.take_due(now(), min(free, BATCH))
        for row in rows:
            await self._slots.acquire()
            task = asyncio.create_task(self._deliver(row))
            self._tasks.add(task)
            task.add_done_callback(self._finished)
        return len(rows)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())

    async def _deliver(self, row: AnyRow) -> None:
        envelope = {
            "attempt": row.attempts,
            "cue_id": row.cue_id,
            "execution_id": str(row.id),
            "name": row.cue_name,
            "payload": json.loads(row.payload),
            "scheduled_for": format_timestamp(row.scheduled_for),
        }
        body = json.dumps(envelope, sort_keys=True).encode()
        secret = row.webhook_secret  # read when the attempt was taken, just now: never queued
        custom = {
            k: v for k, v in json.loads(row.callback_headers).items() if not k.lower().startswith("x-cueapi-")
        }
        headers = {
            **_signed_headers(secret or "", body, {}),
            "X-CueAPI-Cue-Id": row.cue_id,
            "X-CueAPI-Execution-Id": str(row.id),
            "X-CueAPI-Scheduled-For": format_timestamp(row.scheduled_for),
            "X-CueAPI-Attempt": str(row.attempts),
            **custom,
        }
        attempt = await self.sender.send(
            row.callback_method, row.callback_url, body, headers, row.timeout_seconds
        )
        failed = await self._results.submit(_Finished(row, attempt))
        if attempt.succeeded:
            await self._body_outcome(row, attempt.body or "")
        elif failed:
            self._on_failed([row.id])

    async def _store_results(self, finished: Sequence[_Finished]) -> list[bool]:
        """Store the results of a batch of attempts in one transaction. Returns,
        per attempt, whether its execution failed for good."""
        moment = now()
        delivered = [
            (f.row, f.attempt.http_status, (f.attempt.body or "")[:RESPONSE_BODY_LIMIT])
            for f in finished
            if f.attempt.succeeded
        ]
        failed: list[bool] = []
        async with self._db.unit_of_work() as uow:
            await uow.deliveries.succeeded_many(delivered, moment)
            for f in finished:
                if f.attempt.succeeded:
                    failed.append(False)
                    continue
                failed.append(
                    await fail_attempt(uow, f.row, f.attempt.error or "", f.attempt.http_status, moment)
                )
            # The cues last, all in one call (which orders their rows).
            results = [(row.cue_id, "success") for row, _, _ in delivered]
            results += [(f.row.cue_id, "failed") for f, gone in zip(finished, failed, strict=True) if gone]
            await uow.cues.record_results(results, moment)
            await uow.commit()
        return failed

    async def _body_outcome(self, row: AnyRow, text: str) -> None:
        """A 2xx body that is a JSON object with a boolean `success` is the outcome."""
        try:
            parsed = json.loads(text)
        except ValueError:
            return
        if not isinstance(parsed, dict) or not isinstance(parsed.get("success"), bool):
            return
        fields: dict[str, Any] = {k: parsed[k] for k in _OUTCOME_FIELDS if isinstance(parsed.get(k), str)}
        for name in ("metadata", "artifacts"):
            if name in parsed and parsed[name] is not None:
                fields[name] = json.dumps(parsed[name], separators=(",", ":"), ensure_ascii=False)
        try:
            await self._outcomes.record(
                Caller(row.account_id, 0),
                ReportRequest(str(row.id), OutcomeReport(success=parsed["success"], **fields)),
            )
        except ApiError as error:  # invalid, or the handler already reported: the delivery stands
            log.info("response-body outcome of %s not recorded: %s", row.id, error.code)

    # --- housekeeping -----------------------------------------------------------------------

    async def ready_retries(self, moment: dt.datetime) -> None:
        async with self._db.unit_of_work() as uow:
            count = await uow.deliveries.ready_retries(moment)
            await uow.commit()
        if count:
            self.wake()

    async def recover_stale(self, moment: dt.datetime) -> None:
        failed: list[AnyRow] = []
        async with self._db.unit_of_work() as uow:
            for row in await uow.deliveries.stale(moment, self._stale):
                if await fail_attempt(uow, row, "Recovered from stale delivering state", None, moment):
                    failed.append(row)
            await uow.cues.record_results([(row.cue_id, "failed") for row in failed], moment)
            await uow.commit()
        self._on_failed([row.id for row in failed])


async def fail_attempt(
    repos: Repositories, row: AnyRow, error: str, http_status: int | None, moment: dt.datetime
) -> bool:
    """Attempt n failed: retry after backoff[min(n-1, len-1)] minutes (1 if none
    are set), or fail for good at max_attempts. True when it failed for good; the
    caller then records the cue's result (`CueRepository.record_results`)."""
    if row.attempts < row.retry_max_attempts:
        backoff = json.loads(row.retry_backoff_minutes) or [1]
        delay = dt.timedelta(minutes=backoff[min(row.attempts - 1, len(backoff) - 1)])
        await repos.deliveries.retry_later(row.id, error, http_status, moment + delay, moment)
        return False
    await repos.deliveries.failed(row.id, error, http_status, moment)
    return True


async def notify_cue_failed(db: Database, sender: Sender, execution_id: uuid.UUID) -> None:
    """on_failure.webhook: one signed cue.failed event, 10 s, no retries."""
    async with db.unit_of_work(write=False) as uow:
        row = await uow.deliveries.failure_notice(execution_id)
        if row is None or not row.on_failure_webhook:
            return
        secret = await uow.accounts.webhook_secret(row.account_id)
    event = {
        "event": "cue.failed",
        "cue_id": row.cue_id,
        "cue_name": row.cue_name,
        "execution_id": str(execution_id),
        "attempts": row.attempts,
        "last_http_status": row.http_status,
        "last_error": (row.error_message or "")[:500] or None,
        "failed_at": format_timestamp(row.updated_at),
    }
    body = json.dumps(event, sort_keys=True).encode()
    attempt = await sender.send(
        "POST", row.on_failure_webhook, body, _signed_headers(secret or "", body, {}), NOTIFY_TIMEOUT
    )
    if not attempt.succeeded:
        log.warning("on_failure webhook for %s failed: %s", execution_id, attempt.error)
