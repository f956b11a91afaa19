"""`cueline admin ...`: the partner directory from the command line.

Every command is one call of the PartnerDirectoryService or PartnerAuthService
RPCs on a running server, authenticated like any internal caller with an
account API key (CUELINE_API_KEY). The organizations it creates belong to
that account.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from cueline.partner.v1 import auth_pb2, auth_pb2_grpc, directory_pb2, directory_pb2_grpc


def add_parser(commands: Any) -> None:
    admin = commands.add_parser(
        "admin",
        help="manage partner organizations, members, clients, users and tokens",
        description="Partner directory commands, run against a live server (gRPC).",
    )
    admin.add_argument(
        "--target", help="the server's gRPC address (env CUELINE_TARGET; default 127.0.0.1:50051)"
    )
    admin.add_argument("--json", action="store_true", help="print the whole response as JSON")
    kinds = admin.add_subparsers(dest="admin_kind", required=True, metavar="KIND")

    org = kinds.add_parser("org", help="organizations").add_subparsers(dest="admin_action", required=True)
    org.add_parser("create", help="create an organization; prints its id").add_argument(
        "--name", required=True
    )

    member = kinds.add_parser("member", help="members").add_subparsers(dest="admin_action", required=True)
    create = member.add_parser("create", help="create a member; prints its id")
    create.add_argument("--org", required=True, help="organization id")
    create.add_argument("--external-ref", help="your own id for this person")
    member.add_parser("disable", help="disable a member: its secrets stop working").add_argument("id")

    client = kinds.add_parser("client", help="OAuth clients").add_subparsers(
        dest="admin_action", required=True
    )
    create = client.add_parser("create", help="create a client; prints CLIENT_ID CLIENT_SECRET (shown once)")
    create.add_argument("--org", required=True, help="organization id")
    create.add_argument("--name", required=True)
    client.add_parser("disable", help="disable a client and revoke its tokens").add_argument("id")

    user = kinds.add_parser("user", help="password users").add_subparsers(dest="admin_action", required=True)
    create = user.add_parser("create", help="create a user; the password is read from stdin")
    create.add_argument("--org", required=True, help="organization id")
    create.add_argument("--username", required=True)
    user.add_parser("disable", help="disable a user and revoke its tokens").add_argument("username")

    token = kinds.add_parser("token", help="tokens").add_subparsers(dest="admin_action", required=True)
    revoke = token.add_parser("revoke", help="revoke an access or refresh token")
    revoke.add_argument(
        "token",
        nargs="?",
        help="the token; read from stdin when left out. A token can begin with '-': "
        "give it after `--`, or on stdin",
    )


def _call(args: argparse.Namespace, channel: grpc.Channel) -> tuple[Message, str]:
    """The RPC for the command, and what to print by default."""
    directory = directory_pb2_grpc.PartnerDirectoryServiceStub(channel)
    auth = auth_pb2_grpc.PartnerAuthServiceStub(channel)
    key = os.environ.get("CUELINE_API_KEY", "")
    metadata = (("authorization", f"Bearer {key}"),)

    def run(rpc: Callable[..., Any], request: Message) -> Any:
        return rpc(request, metadata=metadata, timeout=30)

    command = (args.admin_kind, args.admin_action)
    if command == ("org", "create"):
        response = run(directory.CreateOrganization, directory_pb2.CreateOrganizationRequest(name=args.name))
        return response, response.organization.id
    if command == ("member", "create"):
        request = directory_pb2.CreateMemberRequest(organization_id=args.org)
        if args.external_ref is not None:
            request.external_ref = args.external_ref
        response = run(directory.CreateMember, request)
        return response, response.member.id
    if command == ("member", "disable"):
        response = run(directory.DisableMember, directory_pb2.DisableMemberRequest(member_id=args.id))
        return response, f"member {response.member.id} disabled"
    if command == ("client", "create"):
        response = run(
            directory.CreateClient,
            directory_pb2.CreateClientRequest(organization_id=args.org, name=args.name),
        )
        return response, f"{response.client.client_id} {response.client_secret}"
    if command == ("client", "disable"):
        response = run(directory.DisableClient, directory_pb2.DisableClientRequest(client_id=args.id))
        return response, f"client {args.id} disabled, {response.revoked_tokens} tokens revoked"
    if command == ("user", "create"):
        password = sys.stdin.read().rstrip("\r\n")
        response = run(
            directory.CreateUser,
            directory_pb2.CreateUserRequest(
                organization_id=args.org, username=args.username, password=password
            ),
        )
        return response, response.user.id
    if command == ("user", "disable"):
        response = run(directory.DisableUser, directory_pb2.DisableUserRequest(username=args.username))
        return response, f"user {args.username} disabled, {response.revoked_tokens} tokens revoked"
    token = args.token if args.token is not None else sys.stdin.readline().strip()
    response = run(auth.RevokeTokens, auth_pb2.RevokeTokensRequest(token=token))
    return response, f"{response.revoked} tokens revoked"


def main(args: argparse.Namespace) -> int:
    if not os.environ.get("CUELINE_API_KEY"):
        print(
            "cueline: set CUELINE_API_KEY to an account API key (see `cueline keys create`)", file=sys.stderr
        )
        return 2
    target = args.target or os.environ.get("CUELINE_TARGET") or "127.0.0.1:50051"
    with grpc.insecure_channel(target) as channel:
        try:
            response, summary = _call(args, channel)
        except grpc.RpcError as exc:
            print(f"cueline: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json_format.MessageToJson(response, preserving_proto_field_name=True))
    else:
        print(summary)
    return 0
