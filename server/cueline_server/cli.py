"""The `cueline` command."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

from cueline_server import __version__, admin, logs
from cueline_server.config import Settings


def _database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        help="sqlite:///PATH or postgresql://USER@HOST/DB (env CUELINE_DATABASE_URL; "
        "default: a SQLite file in the data directory)",
    )
    parser.add_argument(
        "--data-dir", type=Path, help="where the default SQLite file lives (env CUELINE_DATA_DIR)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cueline",
        description="cueline: cues, executions and write-once outcomes over gRPC and REST.",
    )
    parser.add_argument("--version", action="version", version=f"cueline {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC and REST server", description="Run the server.")
    serve.add_argument("--host", help="address to bind (env CUELINE_HOST; default 127.0.0.1)")
    serve.add_argument(
        "--grpc-port", type=int, help="gRPC port (env CUELINE_GRPC_PORT; default 50051; 0 picks one)"
    )
    serve.add_argument(
        "--http-port", type=int, help="REST port (env CUELINE_HTTP_PORT; default 8080; 0 picks one)"
    )
    serve.add_argument(
        "--processes",
        type=int,
        help="server processes sharing the ports, PostgreSQL only (env CUELINE_PROCESSES; default 1)",
    )
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (env CUELINE_LOG_LEVEL)")
    _database_options(serve)

    db = commands.add_parser("db", help="database schema commands", description="Database schema commands.")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = db_commands.add_parser(
        "upgrade", help="apply pending migrations", description="Apply pending migrations."
    )
    _database_options(upgrade)
    current = db_commands.add_parser(
        "current", help="print the schema revision", description="Print the schema revision."
    )
    _database_options(current)

    keys = commands.add_parser("keys", help="API key commands", description="API key commands.")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = key_commands.add_parser(
        "create",
        help="create an account and print its API key",
        description="Create an account and print its new API key (works even when registration is off).",
    )
    create.add_argument("--email", required=True, help="the account's email address")
    _database_options(create)
    admin.add_parser(commands)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(args, name, None)
        for name in ("host", "grpc_port", "http_port", "processes", "database_url", "data_dir", "log_level")
    }
    return Settings.from_env(**overrides)


async def _create_key(settings: Settings, email: str) -> str:
    from cueline_server.app import prepare_schema
    from cueline_server.services.accounts import AccountService
    from cueline_server.store.database import Database

    await prepare_schema(settings)
    db = Database(settings.resolved_database_url())
    try:
        registration = await AccountService(db, dataclasses.replace(settings, allow_register=True)).register(
            email
        )
    finally:
        await db.dispose()
    return registration.api_key


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    logs.configure(settings.log_level)
    from sqlalchemy.exc import OperationalError

    from cueline_server.app import Runtime, StartupError, database_unusable
    from cueline_server.errors import ApiError
    from cueline_server.eventloop import UnknownEventLoop, loop_factory
    from cueline_server.store import migrate
    from cueline_server.supervisor import supervise

    if args.command == "admin":
        return admin.main(args)
    try:
        if args.command == "serve":
            try:
                factory = loop_factory(settings.event_loop)
            except UnknownEventLoop as exc:
                raise StartupError(str(exc)) from None
            if settings.processes < 1:
                raise StartupError(f"CUELINE_PROCESSES must be at least 1, not {settings.processes}")
            if settings.processes != 1:
                return supervise(settings)
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(Runtime(settings).run())
        elif args.command == "db":
            url = settings.resolved_database_url()
            try:
                if args.db_command == "upgrade":
                    print(f"schema at revision {migrate.upgrade(url)}")
                elif args.db_command == "current":
                    print(migrate.current_revision(url) or "(empty database)")
            except OperationalError as exc:
                raise database_unusable(exc) from None
        elif args.command == "keys":
            print(asyncio.run(_create_key(settings, args.email)))
    except StartupError as exc:
        print(f"cueline: {exc}", file=sys.stderr)
        return 1
    except ApiError as exc:
        print(f"cueline: {exc.message}", file=sys.stderr)
        return 1
    return 0
