"""Servicers of cueline.partner.v1: actions for internal callers, the three
partner paths, partner OAuth2 tokens, and the partner directory."""

from __future__ import annotations

from typing import Any

from cueline.partner.v1 import actions_pb2, auth_pb2, directory_pb2
from cueline_server.api.jsoncodec import struct_to_json
from cueline_server.api.pipeline import Call
from cueline_server.errors import Violation, partner_validation, unreadable_body
from cueline_server.servicers.convert import put_time, to_enum
from cueline_server.services.actions import ActionService, NewAction, Origin, required_parameters
from cueline_server.services.partners import SCOPE, DirectoryService, IssuedTokens, TokenService
from cueline_server.store.repositories import AnyRow


def body_of(message: Any) -> dict[str, Any] | None:
    """The request's JSON body object, or None when no body was sent."""
    if not message.HasField("body"):
        return None
    try:
        plain: dict[str, Any] = struct_to_json(message.body)
    except ValueError:  # gRPC callers can send numbers JSON has no words for (NaN, Infinity)
        raise unreadable_body() from None
    return plain


def origin_of(call: Call) -> Origin:
    return Origin(call.peer, call.metadata.get("user-agent", ""))


def action_message(row: AnyRow, target: actions_pb2.Action) -> actions_pb2.Action:
    target.id = str(row.id)
    target.organization_id = str(row.organization_id)
    target.subject = row.subject
    target.code = row.code
    for name in ("title", "message", "data", "redirect_url_template"):
        if getattr(row, name) is not None:
            setattr(target, name, getattr(row, name))
    target.required_parameters.extend(required_parameters(row))
    target.state = to_enum(actions_pb2.ActionState, row.state)
    put_time(target.create_time, row.created_at)
    put_time(target.complete_time, row.completed_at)
    return target


def event_message(row: AnyRow, target: actions_pb2.ActionEvent) -> None:
    target.id = str(row.id)
    target.action_id = str(row.action_id)
    target.attempt_id = str(row.attempt_id)
    target.type = to_enum(actions_pb2.ActionEventType, row.type)
    target.member_id = str(row.member_id)
    put_time(target.time, row.time)
    target.remote_address = row.remote_address
    target.user_agent = row.user_agent
    for name in ("state", "location", "client_info", "parameters", "payload"):
        if getattr(row, name) is not None:
            setattr(target, name, getattr(row, name))
    if row.superseded_attempt_id is not None:
        target.superseded_attempt_id = str(row.superseded_attempt_id)


class ActionServicer:
    def __init__(self, actions: ActionService) -> None:
        self._actions = actions

    async def CreateAction(
        self, request: actions_pb2.CreateActionRequest, call: Call
    ) -> actions_pb2.CreateActionResponse:
        action = request.action
        row = await self._actions.create(
            call.account.account_id,
            NewAction(
                organization_id=action.organization_id,
                subject=action.subject,
                code=action.code,
                title=action.title if action.HasField("title") else None,
                message=action.message if action.HasField("message") else None,
                data=action.data if action.HasField("data") else None,
                required_parameters=list(action.required_parameters),
                redirect_url_template=(
                    action.redirect_url_template if action.HasField("redirect_url_template") else None
                ),
                request_id=request.request_id if request.HasField("request_id") else None,
            ),
        )
        response = actions_pb2.CreateActionResponse()
        action_message(row, response.action)
        return response

    async def GetAction(
        self, request: actions_pb2.GetActionRequest, call: Call
    ) -> actions_pb2.GetActionResponse:
        row = await self._actions.get(call.account.account_id, request.organization_id, request.action_id)
        response = actions_pb2.GetActionResponse()
        action_message(row, response.action)
        return response

    async def ListActions(
        self, request: actions_pb2.ListActionsRequest, call: Call
    ) -> actions_pb2.ListActionsResponse:
        listed = await self._actions.list(
            call.account.account_id, request.organization_id, request.subject, request.member_id
        )
        response = actions_pb2.ListActionsResponse(
            action_needed=listed.action_needed, has_unread_information=listed.has_unread_information
        )
        for item in listed.actions:
            out = response.actions.add(id=str(item.row.id), code=item.row.code, state=item.state)
            for name in ("title", "message", "data"):
                if getattr(item.row, name) is not None:
                    setattr(out, name, getattr(item.row, name))
            put_time(out.created_at, item.row.created_at)
            out.resolution_link.url = item.url
            out.resolution_link.required_parameters.extend(item.required_parameters)
            put_time(out.resolution_link.expires_at, item.expires_at)
        return response

    async def ListActionEvents(
        self, request: actions_pb2.ListActionEventsRequest, call: Call
    ) -> actions_pb2.ListActionEventsResponse:
        rows, token = await self._actions.events(
            call.account.account_id,
            request.organization_id,
            request.action_id,
            request.page_size,
            request.page_token,
        )
        response = actions_pb2.ListActionEventsResponse(next_page_token=token)
        for row in rows:
            event_message(row, response.events.add())
        return response


class PartnerActionServicer:
    def __init__(self, actions: ActionService) -> None:
        self._actions = actions

    @staticmethod
    def _secret(request: Any) -> str | None:
        return request.secret if request.HasField("secret") else None

    async def ResolveAction(
        self, request: actions_pb2.ResolveActionRequest, call: Call
    ) -> actions_pb2.ResolveActionResponse:
        result = await self._actions.resolve(
            call.partner_caller, request.cue_id, self._secret(request), body_of(request), origin_of(call)
        )
        response = actions_pb2.ResolveActionResponse()
        response.result.update(result)
        return response

    async def ReportActionState(
        self, request: actions_pb2.ReportActionStateRequest, call: Call
    ) -> actions_pb2.ReportActionStateResponse:
        action_id = await self._actions.report_state(
            request.cue_id, self._secret(request), body_of(request), origin_of(call)
        )
        return actions_pb2.ReportActionStateResponse(action_id=action_id)

    async def ResolveInformationAction(
        self, request: actions_pb2.ResolveInformationActionRequest, call: Call
    ) -> actions_pb2.ResolveInformationActionResponse:
        action_id = await self._actions.resolve_information(
            call.partner_caller, request.cue_id, self._secret(request), body_of(request), origin_of(call)
        )
        return actions_pb2.ResolveInformationActionResponse(action_id=action_id)


def _strings(body: dict[str, Any], names: tuple[str, ...]) -> tuple[list[str], list[Violation]]:
    values: list[str] = []
    problems: list[Violation] = []
    for name in names:
        value = body.get(name)
        if name not in body:
            problems.append(Violation(f"body.{name}", "Field required", "missing"))
        elif not isinstance(value, str):
            problems.append(Violation(f"body.{name}", "Input should be a valid string", "string_type"))
        else:
            values.append(value)
    return values, problems


class PartnerAuthServicer:
    def __init__(self, tokens: TokenService) -> None:
        self._tokens = tokens

    async def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, call: Call
    ) -> auth_pb2.IssueTokenResponse:
        body = body_of(request) or {}
        grant = body.get("grant_type")
        if "grant_type" not in body:
            raise partner_validation([Violation("body.grant_type", "Field required", "missing")])
        if grant not in ("password", "refresh_token"):
            raise partner_validation(
                [
                    Violation(
                        "body.grant_type", "Input should be 'password' or 'refresh_token'", "literal_error"
                    )
                ]
            )
        names = ("username", "password") if grant == "password" else ("refresh_token",)
        values, problems = _strings(body, names)
        if problems:
            raise partner_validation(problems)
        issued: IssuedTokens = (
            await self._tokens.password_grant(*values)
            if grant == "password"
            else await self._tokens.refresh_grant(*values)
        )
        return auth_pb2.IssueTokenResponse(
            access_token=issued.access_token,
            expires_in=issued.expires_in,
            token_type="Bearer",
            scope=SCOPE,
            refresh_token=issued.refresh_token or "",
        )

    async def IssueClientToken(
        self, request: auth_pb2.IssueClientTokenRequest, call: Call
    ) -> auth_pb2.IssueClientTokenResponse:
        grant = (body_of(request) or {}).get("grant_type")
        if grant is None:
            raise partner_validation([Violation("body.grant_type", "Field required", "missing")])
        if grant != "client_credentials":
            raise partner_validation(
                [Violation("body.grant_type", "Input should be 'client_credentials'", "literal_error")]
            )
        issued = await self._tokens.client_credentials(call.metadata.get("authorization"))
        return auth_pb2.IssueClientTokenResponse(
            access_token=issued.access_token, expires_in=issued.expires_in, token_type="Bearer", scope=SCOPE
        )

    async def RevokeTokens(
        self, request: auth_pb2.RevokeTokensRequest, call: Call
    ) -> auth_pb2.RevokeTokensResponse:
        target = request.WhichOneof("target") or ""
        revoked = await self._tokens.revoke(
            call.account.account_id, **({target: getattr(request, target)} if target else {})
        )
        return auth_pb2.RevokeTokensResponse(revoked=revoked)


def _organization(row: AnyRow, target: directory_pb2.Organization) -> None:
    target.id = str(row.id)
    target.name = row.name
    put_time(target.create_time, row.created_at)


def _member(row: AnyRow, target: directory_pb2.Member) -> None:
    target.id = str(row.id)
    target.organization_id = str(row.organization_id)
    if row.external_ref is not None:
        target.external_ref = row.external_ref
    target.disabled = row.disabled
    put_time(target.create_time, row.created_at)


def _client(row: AnyRow, target: directory_pb2.Client) -> None:
    target.client_id = row.client_id
    target.organization_id = str(row.organization_id)
    target.name = row.name
    target.disabled = row.disabled
    put_time(target.create_time, row.created_at)


def _user(row: AnyRow, target: directory_pb2.User) -> None:
    target.id = str(row.id)
    target.organization_id = str(row.organization_id)
    target.username = row.username
    target.disabled = row.disabled
    put_time(target.create_time, row.created_at)


class PartnerDirectoryServicer:
    def __init__(self, directory: DirectoryService) -> None:
        self._directory = directory

    async def CreateOrganization(
        self, request: directory_pb2.CreateOrganizationRequest, call: Call
    ) -> directory_pb2.CreateOrganizationResponse:
        row = await self._directory.create_organization(call.account.account_id, request.name)
        response = directory_pb2.CreateOrganizationResponse()
        _organization(row, response.organization)
        return response

    async def CreateMember(
        self, request: directory_pb2.CreateMemberRequest, call: Call
    ) -> directory_pb2.CreateMemberResponse:
        row = await self._directory.create_member(
            call.account.account_id,
            request.organization_id,
            request.external_ref if request.HasField("external_ref") else None,
        )
        response = directory_pb2.CreateMemberResponse()
        _member(row, response.member)
        return response

    async def DisableMember(
        self, request: directory_pb2.DisableMemberRequest, call: Call
    ) -> directory_pb2.DisableMemberResponse:
        row = await self._directory.disable_member(call.account.account_id, request.member_id)
        response = directory_pb2.DisableMemberResponse()
        _member(row, response.member)
        return response

    async def CreateClient(
        self, request: directory_pb2.CreateClientRequest, call: Call
    ) -> directory_pb2.CreateClientResponse:
        row, secret = await self._directory.create_client(
            call.account.account_id, request.organization_id, request.name
        )
        response = directory_pb2.CreateClientResponse(client_secret=secret)
        _client(row, response.client)
        return response

    async def DisableClient(
        self, request: directory_pb2.DisableClientRequest, call: Call
    ) -> directory_pb2.DisableClientResponse:
        row, revoked = await self._directory.disable_client(call.account.account_id, request.client_id)
        response = directory_pb2.DisableClientResponse(revoked_tokens=revoked)
        _client(row, response.client)
        return response

    async def CreateUser(
        self, request: directory_pb2.CreateUserRequest, call: Call
    ) -> directory_pb2.CreateUserResponse:
        row = await self._directory.create_user(
            call.account.account_id, request.organization_id, request.username, request.password
        )
        response = directory_pb2.CreateUserResponse()
        _user(row, response.user)
        return response

    async def DisableUser(
        self, request: directory_pb2.DisableUserRequest, call: Call
    ) -> directory_pb2.DisableUserResponse:
        row, revoked = await self._directory.disable_user(call.account.account_id, request.username)
        response = directory_pb2.DisableUserResponse(revoked_tokens=revoked)
        _user(row, response.user)
        return response
