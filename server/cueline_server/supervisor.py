"""`cueline serve` with CUELINE_PROCESSES above 1: several server processes on one port.

Python runs one request at a time per process, so one process uses about one
core however many the machine has. The supervisor migrates the schema once,
then starts that many `cueline serve` children which bind the same gRPC and
HTTP ports with SO_REUSEPORT; the kernel spreads new connections across them.
Each child is a full replica (its own pools, scheduler, dispatcher and
rate-limit windows), which is why this needs PostgreSQL: SQLite has one writer.

The supervisor holds both ports (bound, never listening) for as long as it
runs, so a port of 0 is chosen once and no other program takes it between
children. SIGTERM or SIGINT is passed on to every child, and each shuts down
gracefully; one still running well after its drain and grace periods is
killed. If a child exits on its own, the others are stopped and the
supervisor exits 1, so whatever restarts the service sees it fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from sqlalchemy.engine import make_url

from cueline_server.app import StartupError, bind_reuse_port, prepare_schema
from cueline_server.config import Settings
from cueline_server.services.secrets import new_key

log = logging.getLogger("cueline")

POLL_SECONDS = 0.2
STOP_MARGIN_SECONDS = 15.0


def child_environment(settings: Settings, grpc_port: int, http_port: int) -> dict[str, str]:
    """What every child is told: the same database, ports and action secret keys."""
    env = {
        **os.environ,
        "CUELINE_PROCESSES": "1",
        "CUELINE_REUSE_PORT": "true",
        "CUELINE_SUPERVISOR_PID": str(os.getpid()),
        "CUELINE_AUTO_MIGRATE": "false",  # the supervisor has migrated
        "CUELINE_HOST": settings.host,
        "CUELINE_GRPC_PORT": str(grpc_port),
        "CUELINE_HTTP_PORT": str(http_port),
        "CUELINE_DATABASE_URL": settings.resolved_database_url(),
        "CUELINE_LOG_LEVEL": settings.log_level,
    }
    if not settings.action_secret_keys:
        log.warning(
            "CUELINE_ACTION_SECRET_KEYS is not set: action secrets use a random key that "
            "this server's processes share and that dies with them"
        )
        env["CUELINE_ACTION_SECRET_KEYS"] = f"local={new_key()}"
        env["CUELINE_ACTION_SECRET_SIGNING_KID"] = "local"
    return env


def supervise(settings: Settings) -> int:
    """Run settings.processes children until a signal (exit 0 when all stop
    cleanly) or until one of them exits on its own (exit 1)."""
    if make_url(settings.resolved_database_url()).get_backend_name() != "postgresql":
        raise StartupError(
            "CUELINE_PROCESSES above 1 needs PostgreSQL: SQLite has a single writer, so run one process"
        )
    asyncio.run(prepare_schema(settings))
    held = [bind_reuse_port(settings.host, port) for port in (settings.grpc_port, settings.http_port)]
    try:
        grpc_port, http_port = (sock.getsockname()[1] for sock in held)
        env = child_environment(settings, grpc_port, http_port)
        # A child's own shutdown: drain, then grace for calls in flight, then closing.
        stop_seconds = settings.shutdown_drain_seconds + settings.shutdown_grace_seconds + STOP_MARGIN_SECONDS
        return _run_children(settings.processes, env, stop_seconds)
    finally:
        for sock in held:
            sock.close()


def _run_children(count: int, env: dict[str, str], stop_seconds: float) -> int:
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    children: list[subprocess.Popen[bytes]] = []
    failed = None
    try:
        for _ in range(count):
            children.append(subprocess.Popen([sys.executable, "-m", "cueline_server", "serve"], env=env))
        log.info("supervising %d server processes: %s", count, " ".join(str(c.pid) for c in children))
        while not stopping and failed is None:
            failed = next((c for c in children if c.poll() is not None), None)
            time.sleep(POLL_SECONDS)
    finally:
        if failed is not None:
            log.error("server process %d exited %s: stopping the others", failed.pid, failed.returncode)
        codes = _stop(children, stop_seconds)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # A child stopped by the signal itself (one that came before its handlers were set) stopped cleanly.
    clean = {0, -signal.SIGTERM, -signal.SIGINT} if stopping else {0}
    return 1 if failed is not None or any(code not in clean for code in codes) else 0


def _stop(children: list[subprocess.Popen[bytes]], seconds: float) -> list[int]:
    """SIGTERM to each child still running; SIGKILL to any still running `seconds` later."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + seconds
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("server process %d did not stop in %.0fs: killing it", child.pid, seconds)
            child.kill()
    return [child.wait() for child in children]
