"""Partner actions: cues of kind "action" whose attempts carry write-once outcomes.

State machine (contract partner-v2 section 2):

    PENDING --/resolve--> IN_PROGRESS --/state success--> COMPLETED
       ^                      |  \\--/resolve--> IN_PROGRESS (open attempt abandoned)
       \\----/state fail------/
    PENDING (information) --/information/resolve--> COMPLETED

Every partner request runs in one transaction with the action row locked, in
the contract's order of checks, and writes its audit event in that same
transaction. Codes other than the two built-in ones pass through a generic
handler.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from cueline_server.api.jsoncodec import compact_json, loads
from cueline_server.errors import (
    Violation,
    action_not_found,
    concurrent_modification,
    field_error,
    invalid_secret,
    no_attempt_in_progress,
    not_found,
    partner_validation,
    unsupported_for_code,
    validation_error,
)
from cueline_server.services.partners import PartnerCaller, organization_not_found, parse_uuid
from cueline_server.services.secrets import InvalidSecret, SecretCodec, secret_hash
from cueline_server.store.database import Database, UnitOfWork
from cueline_server.store.repositories import AnyRow, DuplicateError

log = logging.getLogger("cueline.actions")

REAUTHENTICATE = "reauthenticate"
INFORMATION = "information"
REAUTHENTICATE_PARAMETERS = ("successUrl", "cancelUrl")
CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
PARAMETER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
RESERVED_PARAMETERS = ("location", "clientInfo")
PLACEHOLDER = re.compile(r"\{(success_url|cancel_url|language|attempt)\}")
DATA_LIMIT = 16 * 1024
PARTNER_PREFIX = "/api/partners/v2.0/cues"
DEFAULT_EVENTS_PAGE = 50


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class NewAction:
    organization_id: str
    subject: str
    code: str
    title: str | None
    message: str | None
    data: str | None  # JSON text
    required_parameters: Sequence[str]
    redirect_url_template: str | None
    request_id: str | None


@dataclass(frozen=True)
class Origin:
    """Where a partner request came from, for the audit trail."""

    remote_address: str
    user_agent: str


@dataclass(frozen=True)
class ListedAction:
    row: AnyRow
    state: str
    url: str
    required_parameters: list[str]
    expires_at: dt.datetime


@dataclass(frozen=True)
class ActionList:
    actions: list[ListedAction]
    action_needed: bool
    has_unread_information: bool


def is_web_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False


def render_template(template: str, values: Mapping[str, str]) -> str:
    """Each placeholder replaced by its value, percent-encoded (RFC 3986 unreserved kept)."""
    return PLACEHOLDER.sub(lambda m: quote(values[m.group(1)], safe=""), template)


def _template_problem(template: str) -> str | None:
    if "{" in PLACEHOLDER.sub("", template) or "}" in PLACEHOLDER.sub("", template):
        return "only the placeholders {success_url}, {cancel_url}, {language} and {attempt} are allowed"
    empty = dict.fromkeys(("success_url", "cancel_url", "language", "attempt"), "")
    if not is_web_url(render_template(template, empty)):
        return "must render to an absolute http or https URL"
    return None


def _check_new_action(new: NewAction) -> list[Violation]:
    problems: list[Violation] = []
    if not CODE.fullmatch(new.code):
        problems.append(Violation("action.code", "must match ^[a-z][a-z0-9_]{0,63}$"))
    builtin = new.code in (REAUTHENTICATE, INFORMATION)
    if builtin and new.required_parameters:
        problems.append(
            Violation(
                "action.required_parameters", f"is set by the {new.code} handler and cannot be supplied"
            )
        )
    for index, name in enumerate(new.required_parameters):
        if not PARAMETER.fullmatch(name) or name in RESERVED_PARAMETERS:
            problems.append(
                Violation(
                    f"action.required_parameters.{index}",
                    "must match ^[A-Za-z_][A-Za-z0-9_]{0,63}$ and not be location or clientInfo",
                )
            )
    if new.code == REAUTHENTICATE:
        if new.redirect_url_template is None:
            problems.append(Violation("action.redirect_url_template", "is required for code reauthenticate"))
        else:
            problem = _template_problem(new.redirect_url_template)
            if problem:
                problems.append(Violation("action.redirect_url_template", problem))
    elif new.redirect_url_template is not None:
        problems.append(Violation("action.redirect_url_template", "is only allowed for code reauthenticate"))
    if new.data is not None:
        if not isinstance(loads(new.data), dict):
            problems.append(Violation("action.data", "Input should be a valid dictionary or object"))
        elif len(new.data.encode()) > DATA_LIMIT:
            problems.append(Violation("action.data", f"must be at most {DATA_LIMIT} bytes serialized"))
    return problems


def required_parameters(row: AnyRow) -> list[str]:
    """The body names /resolve needs for this action: set by the code's handler."""
    if row.code == REAUTHENTICATE:
        return list(REAUTHENTICATE_PARAMETERS)
    if row.code == INFORMATION:
        return []
    parameters: list[str] = loads(row.required_parameters)
    return parameters


def _page_token(row: AnyRow) -> str:
    raw = f"{row.time.isoformat()}|{row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(token: str) -> tuple[dt.datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        moment, _, event_id = raw.partition("|")
        return dt.datetime.fromisoformat(moment), uuid.UUID(event_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise field_error("page_token", "is not a page token from this list") from None


# --- partner request bodies -----------------------------------------------------------------------


def _missing(loc: str) -> Violation:
    return Violation(loc, "Field required", "missing")


def _objects(body: Mapping[str, Any], names: Sequence[str]) -> list[Violation]:
    """Free-form JSON fields must be objects or null."""
    return [
        Violation(f"body.{name}", "Input should be a valid dictionary", "dict_type")
        for name in names
        if body.get(name) is not None and not isinstance(body[name], dict)
    ]


def _json_or_none(value: Any) -> str | None:
    return None if value is None else compact_json(value)


class ActionService:
    def __init__(self, db: Database, codec: SecretCodec, public_base_url: str) -> None:
        self._db = db
        self._codec = codec
        # The start of every resolution link; the runtime fills it in from the
        # bound HTTP address when the settings leave it empty.
        self.public_base_url = public_base_url

    # --- internal callers -------------------------------------------------------------------------

    async def _organization(self, uow: UnitOfWork, account_id: uuid.UUID, organization_id: str) -> AnyRow:
        row = await uow.partner.organization(parse_uuid(organization_id, "organization_id"), account_id)
        if row is None:
            raise organization_not_found()
        return row

    async def create(self, account_id: uuid.UUID, new: NewAction) -> AnyRow:
        problems = _check_new_action(new)
        if problems:
            raise validation_error(problems)
        request_id = parse_uuid(new.request_id, "request_id") if new.request_id is not None else None
        moment = now()
        action_id = uuid.uuid4()
        async with self._db.unit_of_work() as uow:
            org = await self._organization(uow, account_id, new.organization_id)
            if request_id is not None:
                earlier = await uow.partner.action_by_request(org.id, request_id)
                if earlier is not None:
                    return earlier
            try:
                await uow.partner.add_action(
                    {
                        "id": action_id,
                        "organization_id": org.id,
                        "subject": new.subject,
                        "code": new.code,
                        "title": new.title,
                        "message": new.message,
                        "data": new.data,
                        "required_parameters": compact_json(list(new.required_parameters)),
                        "redirect_url_template": new.redirect_url_template,
                        "request_id": request_id,
                        "state": "pending",
                        "created_at": moment,
                        "completed_at": None,
                        "updated_at": moment,
                    }
                )
            except DuplicateError:
                pass  # a concurrent create with the same request_id won; return its action
            else:
                await uow.commit()
        async with self._db.unit_of_work(write=False) as uow:
            row = (
                await uow.partner.action_by_request(org.id, request_id)
                if request_id is not None
                else await uow.partner.action(action_id)
            )
        assert row is not None
        return row

    async def get(self, account_id: uuid.UUID, organization_id: str, action_id: str) -> AnyRow:
        async with self._db.unit_of_work(write=False) as uow:
            org = await self._organization(uow, account_id, organization_id)
            row = await uow.partner.owned_action(org.id, parse_uuid(action_id, "action_id"))
        if row is None:
            raise not_found("action_not_found", "Action not found")
        return row

    async def list(
        self, account_id: uuid.UUID, organization_id: str, subject: str, member_id: str
    ) -> ActionList:
        member_uuid = parse_uuid(member_id, "member_id")
        async with self._db.unit_of_work(write=False) as uow:
            org = await self._organization(uow, account_id, organization_id)
            member = await uow.partner.member(member_uuid)
            if member is None or member.organization_id != org.id or member.disabled:
                raise field_error("member_id", "is not an enabled member of the organization")
            rows = await uow.partner.active_actions(org.id, subject)
        moment = now()
        base = self.public_base_url.rstrip("/")
        listed: list[ListedAction] = []
        for row in rows:
            secret, expires = self._codec.mint(row.id, member_uuid, moment)
            information = row.code == INFORMATION
            path = "information/resolve" if information else "resolve"
            listed.append(
                ListedAction(
                    row=row,
                    state="pending" if information else row.state,
                    url=f"{base}{PARTNER_PREFIX}/{row.id}/{path}?secret={secret}",
                    required_parameters=required_parameters(row),
                    expires_at=expires,
                )
            )
        return ActionList(
            actions=listed,
            action_needed=any(r.code != INFORMATION for r in rows),
            has_unread_information=any(r.code == INFORMATION for r in rows),
        )

    async def events(
        self, account_id: uuid.UUID, organization_id: str, action_id: str, page_size: int, page_token: str
    ) -> tuple[Sequence[AnyRow], str]:
        size = page_size or DEFAULT_EVENTS_PAGE
        after = _after(page_token) if page_token else None
        async with self._db.unit_of_work(write=False) as uow:
            org = await self._organization(uow, account_id, organization_id)
            action = await uow.partner.owned_action(org.id, parse_uuid(action_id, "action_id"))
            if action is None:
                raise not_found("action_not_found", "Action not found")
            rows = await uow.partner.events(action.id, after, size + 1)
        if len(rows) > size:
            return rows[:size], _page_token(rows[size - 1])
        return rows, ""

    # --- partners ---------------------------------------------------------------------------------

    async def _locked_action(self, uow: UnitOfWork, cue_id: str, organization_id: uuid.UUID | None) -> AnyRow:
        """The active action, locked; any other id is 404, whatever the reason."""
        try:
            action_id = uuid.UUID(cue_id)
        except ValueError:
            raise action_not_found() from None
        row = await uow.partner.action(action_id, lock=True)
        if row is None or row.state == "completed":
            raise action_not_found()
        if organization_id is not None and row.organization_id != organization_id:
            raise action_not_found()
        return row

    async def _member_for(
        self, uow: UnitOfWork, secret: str, action: AnyRow, moment: dt.datetime
    ) -> uuid.UUID:
        """The secret's member, after every check of contract section 4; 403 otherwise."""
        try:
            verified = self._codec.verify(secret, action.id, moment)
            member = await uow.partner.member(verified.member_id)
            if member is None:
                raise InvalidSecret("unknown member")
            if member.disabled:
                raise InvalidSecret("member disabled")
            if member.organization_id != action.organization_id:
                raise InvalidSecret("member of another organization")
        except InvalidSecret as exc:
            log.debug("secret refused for action %s: %s", action.id, exc)
            raise invalid_secret() from None
        return verified.member_id

    async def _event(
        self,
        uow: UnitOfWork,
        action: AnyRow,
        attempt_id: uuid.UUID,
        member_id: uuid.UUID,
        kind: str,
        origin: Origin,
        moment: dt.datetime,
        **values: Any,
    ) -> None:
        await uow.partner.add_event(
            {
                "id": uuid.uuid4(),
                "action_id": action.id,
                "attempt_id": attempt_id,
                "type": kind,
                "member_id": member_id,
                "time": moment,
                "remote_address": origin.remote_address[:255],
                "user_agent": origin.user_agent,
                "state": None,
                "location": None,
                "client_info": None,
                "parameters": None,
                "payload": None,
                "superseded_attempt_id": None,
                **values,
            }
        )

    async def resolve(
        self,
        partner: PartnerCaller,
        cue_id: str,
        secret: str | None,
        body: dict[str, Any] | None,
        origin: Origin,
    ) -> dict[str, str]:
        body = body or {}
        problems = ([_missing("query.secret")] if secret is None else []) + _objects(
            body, RESERVED_PARAMETERS
        )
        if problems:
            raise partner_validation(problems)
        assert secret is not None
        async with self._db.unit_of_work() as uow:
            action = await self._locked_action(uow, cue_id, partner.organization_id)
            moment = now()  # after the lock: events are ordered by commit
            member_id = await self._member_for(uow, secret, action, moment)
            if action.code == INFORMATION:
                raise unsupported_for_code()
            parameters = self._parameters(action, body)
            attempt_id = uuid.uuid4()
            superseded = await uow.partner.open_attempt(action.id)
            if superseded is not None:
                await uow.partner.abandon_attempt(superseded.id, moment)
            await uow.partner.add_attempt(
                {
                    "id": attempt_id,
                    "action_id": action.id,
                    "member_id": member_id,
                    "secret_hash": secret_hash(secret),
                    "parameters": compact_json(parameters),
                    "state": "in_progress",
                    "started_at": moment,
                }
            )
            await self._event(
                uow,
                action,
                attempt_id,
                member_id,
                "start",
                origin,
                moment,
                location=_json_or_none(body.get("location")),
                client_info=_json_or_none(body.get("clientInfo")),
                parameters=compact_json(parameters),
                superseded_attempt_id=superseded.id if superseded is not None else None,
            )
            await uow.partner.set_action_state(action.id, "in_progress", moment)
            await uow.commit()
        if action.code == REAUTHENTICATE:
            values = {
                "success_url": parameters["successUrl"],
                "cancel_url": parameters["cancelUrl"],
                "language": parameters.get("language") or "",
                "attempt": str(attempt_id),
            }
            return {"redirect_url": render_template(action.redirect_url_template, values)}
        return {"action_id": str(action.id)}

    def _parameters(self, action: AnyRow, body: Mapping[str, Any]) -> dict[str, Any]:
        """The code's handler: validate the body, return the parameters it keeps."""
        problems: list[Violation] = []
        if action.code == REAUTHENTICATE:
            for name in REAUTHENTICATE_PARAMETERS:
                value = body.get(name)
                if name not in body:
                    problems.append(_missing(f"body.{name}"))
                elif not isinstance(value, str):
                    problems.append(
                        Violation(f"body.{name}", "Input should be a valid string", "string_type")
                    )
                elif not is_web_url(value):
                    problems.append(
                        Violation(
                            f"body.{name}",
                            "Value error, must be an absolute http or https URL",
                            "value_error",
                        )
                    )
            language = body.get("language")
            if language is not None and not isinstance(language, str):
                problems.append(Violation("body.language", "Input should be a valid string", "string_type"))
            if problems:
                raise partner_validation(problems)
            return {name: body.get(name) for name in (*REAUTHENTICATE_PARAMETERS, "language")}
        problems = [
            _missing(f"body.{name}") for name in required_parameters(action) if body.get(name) is None
        ]
        if problems:
            raise partner_validation(problems)
        return {k: v for k, v in body.items() if k not in RESERVED_PARAMETERS}

    async def report_state(
        self, cue_id: str, secret: str | None, body: dict[str, Any] | None, origin: Origin
    ) -> str:
        problems = [_missing("query.secret")] if secret is None else []
        if body is None:
            problems.append(_missing("body"))
        else:
            if "state" not in body:
                problems.append(_missing("body.state"))
            elif body["state"] not in ("success", "fail"):
                problems.append(
                    Violation("body.state", "Input should be 'success' or 'fail'", "literal_error")
                )
            problems += _objects(body, ("payload", "location", "client_info"))
        if problems:
            raise partner_validation(problems)
        assert secret is not None and body is not None
        success = body["state"] == "success"
        async with self._db.unit_of_work() as uow:
            action = await self._locked_action(uow, cue_id, None)
            moment = now()  # after the lock: events are ordered by commit
            member_id = await self._member_for(uow, secret, action, moment)
            attempt = await uow.partner.open_attempt(action.id)
            if attempt is None:
                raise no_attempt_in_progress()
            if attempt.secret_hash != secret_hash(secret):
                log.debug("secret refused for action %s: did not start the open attempt", action.id)
                raise invalid_secret()
            payload = _json_or_none(body.get("payload"))
            if not await uow.partner.record_outcome(attempt.id, success, payload, moment):
                raise concurrent_modification()
            await self._event(
                uow,
                action,
                attempt.id,
                member_id,
                "outcome",
                origin,
                moment,
                state=body["state"],
                location=_json_or_none(body.get("location")),
                client_info=_json_or_none(body.get("client_info")),
                payload=payload,
            )
            await uow.partner.set_action_state(action.id, "completed" if success else "pending", moment)
            await uow.commit()
        return str(action.id)

    async def resolve_information(
        self,
        partner: PartnerCaller,
        cue_id: str,
        secret: str | None,
        body: dict[str, Any] | None,
        origin: Origin,
    ) -> str:
        body = body or {}
        problems = ([_missing("query.secret")] if secret is None else []) + _objects(
            body, ("location", "client_info")
        )
        if problems:
            raise partner_validation(problems)
        assert secret is not None
        async with self._db.unit_of_work() as uow:
            action = await self._locked_action(uow, cue_id, partner.organization_id)
            moment = now()  # after the lock: events are ordered by commit
            member_id = await self._member_for(uow, secret, action, moment)
            if action.code != INFORMATION:
                raise unsupported_for_code()
            attempt_id = uuid.uuid4()
            await uow.partner.add_attempt(
                {
                    "id": attempt_id,
                    "action_id": action.id,
                    "member_id": member_id,
                    "secret_hash": secret_hash(secret),
                    "parameters": "{}",
                    "state": "succeeded",
                    "started_at": moment,
                    "closed_at": moment,
                    "outcome_recorded_at": moment,
                    "outcome_success": True,
                }
            )
            await self._event(
                uow,
                action,
                attempt_id,
                member_id,
                "read",
                origin,
                moment,
                location=_json_or_none(body.get("location")),
                client_info=_json_or_none(body.get("client_info")),
            )
            await uow.partner.set_action_state(action.id, "completed", moment)
            await uow.commit()
        return str(action.id)
