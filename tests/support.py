"""Real parts for the tests: a throwaway PostgreSQL cluster and `cueline serve` processes."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import hmac
import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import psycopg
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pg_binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if not found:
        raise RuntimeError(f"PostgreSQL binary {name!r} not found; set CUELINE_TEST_DATABASE_URL instead")
    return found


class PostgresCluster:
    """A PostgreSQL server in a temporary directory, on a free loopback port.

    As root, the cluster runs as the `postgres` user (PostgreSQL refuses root).
    Tests turn fsync off (they check behaviour, not the test cluster's crash
    safety); benchmarks keep PostgreSQL's durable defaults and record commit
    timestamps (fire lag is measured at commit)."""

    def __init__(self, *, durable: bool = False) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="cueline-pg-"))
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.directory, "postgres", "postgres")
        data = self.directory / "data"
        self._run(
            pg_binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
        )
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c max_connections=300"
        options += " -c track_commit_timestamp=on" if durable else " -c fsync=off -c full_page_writes=off"
        self._run(
            pg_binary("pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(self.directory / "log"),
            "-w",
            "start",
        )
        self._data = data
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = ["runuser", "-u", "postgres", "--", *args] if self._as_postgres else list(args)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(pg_binary("pg_ctl"), "-D", str(self._data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)


def new_database(admin_url: str) -> str:
    """A fresh, empty database on the server of admin_url; returns its URL."""
    name = f"cueline_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


_SERVING = re.compile(r"cueline serving grpc=[\d.]+:(\d+) http=[\d.]+:(\d+)")


@dataclass
class Server:
    """A `cueline serve` process started with environment overrides."""

    database_url: str
    env: dict[str, str] = field(default_factory=dict)
    grpc_port: int = 0
    http_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="cueline-log-")[1]))

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 30.0) -> Server:
        env = {
            **os.environ,
            "CUELINE_DATABASE_URL": self.database_url,
            "CUELINE_HOST": "127.0.0.1",
            "CUELINE_GRPC_PORT": "0",
            "CUELINE_HTTP_PORT": "0",
            # The limiter stays on, but tests poll fast and register many accounts from one IP.
            "CUELINE_DEFAULT_RATE_LIMIT_PER_MINUTE": "1000000",
            **self.env,
        }
        log = self.log_path.open("ab")
        offset = self.log_path.stat().st_size
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cueline_server", "serve"], env=env, stdout=log, stderr=log, cwd=ROOT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            match = _SERVING.search(text)
            if match:
                self.grpc_port, self.http_port = int(match.group(1)), int(match.group(2))
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"cueline serve exited {self.process.returncode}:\n{text}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"cueline serve did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        return code

    def register(self, client: httpx.Client | None = None) -> str:
        """A fresh account's API key: each test works in its own account."""
        email = f"t-{uuid.uuid4().hex[:10]}@example.com"
        response = httpx.post(f"{self.http_url}/v1/auth/register", json={"email": email})
        assert response.status_code == 201, response.text
        key: str = response.json()["api_key"]
        return key


def auth(key: str) -> dict[str, Any]:
    return {"Authorization": f"Bearer {key}"}


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying an account key."""
    return (("authorization", f"Bearer {key}"),)


def error_details(
    error: grpc.RpcError,
) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest | None]:
    """The ErrorInfo (empty if none) and BadRequest (if any) of a failed gRPC call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type, unused-ignore]
    assert status is not None
    info, bad = error_details_pb2.ErrorInfo(), None
    for packed in status.details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            packed.Unpack(info)
        elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
    return info, bad


def signed(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Whether a delivery carries cueline's signature of its body:
    `v1=` HMAC-SHA256 of "{X-CueAPI-Timestamp}." + body under the secret."""
    lower = {name.lower(): value for name, value in headers.items()}
    digest = hmac.new(secret.encode(), lower["x-cueapi-timestamp"].encode() + b"." + body, hashlib.sha256)
    return lower["x-cueapi-signature"] == f"v1={digest.hexdigest()}"


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A local webhook receiver: records every request and answers from a
    script of (status, body, delay) per path, then 200 with an empty object."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: dict[str, list[tuple[int, bytes, float]]] = {}
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                receiver.requests.append(Received(self.command, self.path, dict(self.headers), body))
                steps = receiver.script.get(self.path) or []
                status, reply, delay = steps.pop(0) if steps else (200, b"{}", 0.0)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    if 300 <= status < 400:
                        self.send_header("Location", "/elsewhere")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_POST = do_GET = do_PUT = do_PATCH = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def to(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
