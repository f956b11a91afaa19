"""The cueline process: gRPC and REST in one event loop over one database.

Start-up: migrate (or refuse an old schema), open the database, bind both
ports, report SERVING. On SIGTERM or SIGINT: report NOT_SERVING on gRPC
health and /healthz, stop accepting, give in-flight calls up to
`shutdown_grace_seconds` to finish, then close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn
from grpc_health.v1 import health, health_pb2
from sqlalchemy.exc import OperationalError

from cueline_server.api import openapi
from cueline_server.api.descriptors import methods
from cueline_server.api.grpc_server import build_server, service_names
from cueline_server.api.pipeline import Handler, Pipeline
from cueline_server.api.ratelimit import GrpcRateLimit, RestRateLimit, SlidingWindowLimiter
from cueline_server.api.transcoder import Transcoder
from cueline_server.config import Settings
from cueline_server.dispatch import Dispatcher
from cueline_server.scheduler import Scheduler, scheduler_lead
from cueline_server.servicers.accounts import AccountServicer
from cueline_server.servicers.alerts import AlertServicer
from cueline_server.servicers.cues import CueServicer
from cueline_server.servicers.executions import ExecutionServicer
from cueline_server.servicers.outcomes import OutcomeServicer
from cueline_server.servicers.partner import (
    ActionServicer,
    PartnerActionServicer,
    PartnerAuthServicer,
    PartnerDirectoryServicer,
)
from cueline_server.servicers.probes import ProbeServicer
from cueline_server.servicers.workers import WorkerServicer
from cueline_server.services.accounts import AccountService, Authenticator
from cueline_server.services.actions import ActionService
from cueline_server.services.alerts import AlertService
from cueline_server.services.claims import ClaimService
from cueline_server.services.cues import CueService, NewWork
from cueline_server.services.executions import ExecutionService
from cueline_server.services.outcomes import OutcomeService
from cueline_server.services.partners import DirectoryService, TokenService
from cueline_server.services.probes import ProbeService
from cueline_server.services.secrets import codec_from_settings
from cueline_server.services.workers import WorkerService
from cueline_server.store import migrate
from cueline_server.store.database import Database
from cueline_server.store.work_signal import WorkSignal

log = logging.getLogger("cueline")

HTTP_BACKLOG = 4096
SUPERVISOR_CHECK_SECONDS = 1.0


class StartupError(Exception):
    pass


@dataclass
class Components:
    """The long-lived parts of a cueline process, wired together."""

    authenticator: Authenticator
    tokens: TokenService
    actions: ActionService
    limiter: SlidingWindowLimiter | None  # None when rate limiting is switched off
    scheduler: Scheduler
    dispatcher: Dispatcher
    claims: ClaimService
    handlers: dict[str, Handler]
    work_signal: WorkSignal | None  # PostgreSQL: new work announced to the other processes


def assemble(db: Database, settings: Settings) -> Components:
    """Build the services and servicers. Every RPC must have a handler; an RPC
    without one is a start-up error, not a runtime surprise."""
    if settings.claim_recheck_seconds <= 0:
        raise StartupError("CUELINE_CLAIM_RECHECK_SECONDS must be above 0")
    if settings.grpc_max_connection_age_seconds < 0:
        raise StartupError("CUELINE_GRPC_MAX_CONNECTION_AGE_SECONDS must be 0 (off) or above")
    authenticator = Authenticator(db, settings.auth_cache_seconds)
    limiter = SlidingWindowLimiter() if settings.rate_limit_enabled else None
    alerts = AlertService(db)

    def failed(execution_ids: Sequence[uuid.UUID]) -> None:
        """Executions failed for good: on_failure notices, then the failure-streak alert."""
        dispatcher.notify_failed(execution_ids)
        alerts.failures(execution_ids)

    outcomes = OutcomeService(db, failed=failed, alerts=alerts, lead=scheduler_lead(settings, db))
    dispatcher = Dispatcher(db, settings, outcomes, on_failed=failed)
    alerts.deliver = dispatcher.deliver_alert

    def work_created(created: Sequence[NewWork] | None = None) -> None:
        """New executions may be due: webhooks to send, claims to hand out."""
        if created is None or any(work.transport == "webhook" for work in created):
            dispatcher.wake()
        claims.work_arrived(created)
        if work_signal is not None:
            work_signal.announce(created)

    claims = ClaimService(db, settings, work_created=work_created, failed=failed)
    work_signal = WorkSignal(db.connect_args(), claims.work_arrived) if db.backend == "postgresql" else None
    scheduler = Scheduler(
        db,
        settings,
        # The contract's order: retries due, stale webhooks, expired leases, unclaimed work.
        housekeeping=(
            dispatcher.ready_retries,
            dispatcher.recover_stale,
            claims.recover_leases,
            claims.expire_unclaimed,
            outcomes.apply_deadlines,
        ),
        work_created=work_created,
    )
    cues = CueService(
        db,
        settings,
        schedule_changed=scheduler.wake,
        work_created=work_created,
        deleted=outcomes.forget_recorded,
    )
    try:
        codec = codec_from_settings(settings.action_secret_keys, settings.action_secret_signing_kid)
    except ValueError as exc:
        raise StartupError(f"CUELINE_ACTION_SECRET_KEYS: {exc}") from None
    actions = ActionService(db, codec, settings.public_base_url)
    tokens = TokenService(db)
    servicers: list[Any] = [
        AccountServicer(
            AccountService(db, settings, authenticator, rate_usage=limiter.account_usage if limiter else None)
        ),
        CueServicer(cues),
        ExecutionServicer(ExecutionService(db), claims),
        OutcomeServicer(outcomes),
        AlertServicer(alerts),
        ProbeServicer(ProbeService(db, lambda: scheduler.last_pass, settings.webhook_stale_after_seconds)),
        WorkerServicer(WorkerService(db, settings.worker_heartbeat_timeout_seconds)),
        ActionServicer(actions),
        PartnerActionServicer(actions),
        PartnerAuthServicer(tokens),
        PartnerDirectoryServicer(DirectoryService(db)),
    ]
    found: dict[str, Handler] = {}
    for method in methods():
        for servicer in servicers:
            handler = getattr(servicer, method.name, None)
            if handler is not None:
                found[method.full_name] = handler
                break
        else:
            raise StartupError(f"no servicer implements {method.full_name}")
    return Components(
        authenticator, tokens, actions, limiter, scheduler, dispatcher, claims, found, work_signal
    )


def trusted_networks(spec: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(item.strip()) for item in spec.split(",") if item.strip())
    except ValueError as exc:
        raise StartupError(f"CUELINE_TRUSTED_PROXIES: {exc}") from None


def database_unusable(exc: OperationalError) -> StartupError:
    """The start-up error for a database that cannot be reached or refused the
    connection: the driver's reason, on one line."""
    return StartupError(f"cannot use the database: {' '.join(str(exc.orig).split())}")


async def prepare_schema(settings: Settings) -> None:
    url = settings.resolved_database_url()
    try:
        if settings.auto_migrate:
            revision = await asyncio.to_thread(migrate.upgrade, url)
            log.info("database schema at revision %s", revision)
            return
        current = await asyncio.to_thread(migrate.current_revision, url)
    except OperationalError as exc:
        raise database_unusable(exc) from None
    head = migrate.head_revision()
    if current != head:
        raise StartupError(
            f"database schema is at revision {current}, this version needs {head}: run `cueline db upgrade`"
        )


def bind_reuse_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT, so other processes can bind the same port.
    Its protocol is named (IPPROTO_TCP), not left 0: asyncio sets TCP_NODELAY only
    on sockets that say they are TCP, and without it small answers wait out delayed ACKs."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the runtime decides when to stop."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


async def _serve_http(http: uvicorn.Server, sockets: list[socket.socket] | None) -> None:
    """uvicorn's serving, ending instead of exiting the process when it cannot
    start (it logs why): the runtime then stops with a clear error."""
    with contextlib.suppress(SystemExit):
        await http.serve(sockets)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = asyncio.Event()
        self.serving = False

    async def _watch_supervisor(self, pid: int) -> None:
        """Stop when the supervisor is gone: a process outliving it would keep
        serving its ports, unmanaged, beside whatever starts next."""
        while not self.stopping.is_set():
            if os.getppid() != pid:
                log.error("the supervisor (pid %d) is gone: stopping", pid)
                self.stopping.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), SUPERVISOR_CHECK_SECONDS)

    async def run(self) -> None:
        settings = self.settings
        await prepare_schema(settings)
        db = Database(
            settings.resolved_database_url(),
            pool_size=settings.database_pool_size,
            prepared_statements=settings.database_prepared_statements,
        )
        parts = assemble(db, settings)
        pipeline = Pipeline(
            parts.authenticator,
            parts.handlers,
            partner_authenticator=parts.tokens.authenticate,
            access_log=settings.access_log,
        )
        health_servicer = health.aio.HealthServicer()
        grpc_limit = (
            None
            if parts.limiter is None
            else GrpcRateLimit(parts.limiter, settings.default_rate_limit_per_minute)
        )
        trusted_proxies = trusted_networks(settings.trusted_proxies)
        grpc_server = build_server(
            pipeline,
            health_servicer,
            settings.max_request_bytes + 64 * 1024,
            grpc_limit,
            trusted_proxies,
            reuse_port=settings.reuse_port,
            max_connection_age_seconds=settings.grpc_max_connection_age_seconds,
        )
        try:
            grpc_port = grpc_server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
        except RuntimeError:  # grpc says only that binding failed
            await db.dispose()
            raise StartupError(f"cannot serve gRPC on {settings.host}:{settings.grpc_port}") from None
        transcoder = Transcoder(
            pipeline,
            max_request_bytes=settings.max_request_bytes,
            openapi=openapi.document(),
            ready=lambda: self.serving,
            trusted_proxies=trusted_proxies,
        )
        rest: Any = transcoder
        if parts.limiter is not None:
            rest = RestRateLimit(
                transcoder,
                parts.limiter,
                parts.authenticator,
                settings.default_rate_limit_per_minute,
                trusted_proxies,
            )
        http = _EmbeddedUvicorn(
            uvicorn.Config(
                rest,
                host=settings.host,
                port=settings.http_port,
                http="httptools",
                lifespan="off",
                log_config=None,
                access_log=False,
                server_header=False,
                proxy_headers=False,  # X-Forwarded-For is judged by CUELINE_TRUSTED_PROXIES alone
                timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or 1,
                backlog=HTTP_BACKLOG,
            )
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        sockets = None
        if settings.reuse_port:
            sockets = [bind_reuse_port(settings.host, settings.http_port)]
            sockets[0].listen(HTTP_BACKLOG)
        await grpc_server.start()
        http_task = asyncio.create_task(_serve_http(http, sockets))
        while not http.started:
            if http_task.done():
                failed = http_task.exception()  # uvicorn logged why when it could not bind
                await grpc_server.stop(None)
                await db.dispose()
                reason = "" if failed is None else f": {failed!r}"
                raise StartupError(f"cannot serve HTTP on {settings.host}:{settings.http_port}{reason}")
            await asyncio.sleep(0.01)
        http_port = http.servers[0].sockets[0].getsockname()[1]
        if not settings.public_base_url:
            parts.actions.public_base_url = f"http://{settings.host}:{http_port}"
        background = [
            asyncio.create_task(parts.scheduler.run(self.stopping)),
            asyncio.create_task(parts.dispatcher.run(self.stopping)),
        ]
        if parts.work_signal is not None:
            background.append(asyncio.create_task(parts.work_signal.run(self.stopping)))
        if settings.supervisor_pid:
            background.append(asyncio.create_task(self._watch_supervisor(settings.supervisor_pid)))
        for name in ("", *service_names()):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        # What starting built (modules, descriptors, the schema, about 100,000
        # objects) lives as long as the process. Frozen, it is left out of the full
        # collections that request garbage sets off; walking it took about 40 ms
        # each time, a pause every call in flight waited out.
        gc.collect()
        gc.freeze()
        self.serving = True
        log.info(
            "cueline serving grpc=%s:%d http=%s:%d database=%s loop=%s",
            settings.host,
            grpc_port,
            settings.host,
            http_port,
            db.backend,
            type(loop).__module__.partition(".")[0],  # uvloop or asyncio
        )
        await self.stopping.wait()
        self.serving = False
        await health_servicer.enter_graceful_shutdown()
        if settings.shutdown_drain_seconds > 0:
            log.info("draining: NOT_SERVING for %.1fs before closing", settings.shutdown_drain_seconds)
            await asyncio.sleep(settings.shutdown_drain_seconds)
        log.info("shutting down: in-flight calls have %.0fs to finish", settings.shutdown_grace_seconds)
        parts.claims.stop_waiting()
        http.should_exit = True
        await asyncio.gather(grpc_server.stop(settings.shutdown_grace_seconds), http_task, *background)
        await parts.dispatcher.drain(settings.shutdown_grace_seconds)
        await db.dispose()
        log.info("stopped")
