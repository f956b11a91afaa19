"""Settings: defaults, overridden by CUELINE_* environment variables, overridden by flags."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cueline"


@dataclass(frozen=True)
class Settings:
    """Everything that changes how cueline runs. Each field is also the
    environment variable CUELINE_<FIELD NAME IN UPPER CASE>."""

    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8080
    # Server processes sharing both ports (PostgreSQL only): one process uses
    # about one core. Each is a full replica with its own pools and rate-limit windows.
    processes: int = 1
    # Bind both ports with SO_REUSEPORT, so several processes can share them
    # (set for each of the processes above; also for running replicas side by side).
    reuse_port: bool = False
    # Set by the supervisor of the processes above in each of them: a process
    # whose supervisor is gone (killed outright) stops as on SIGTERM.
    supervisor_pid: int = 0
    # Empty: a SQLite file in data_dir.
    database_url: str = ""
    data_dir: Path = field(default_factory=default_data_dir)
    # Apply pending migrations at start-up; when false, refuse to start on an old schema.
    auto_migrate: bool = True
    allow_register: bool = True
    # After SIGTERM: seconds of reporting NOT_SERVING while still serving, so load
    # balancers stop sending work; then seconds in-flight calls get to finish.
    shutdown_drain_seconds: float = 0.0
    shutdown_grace_seconds: float = 10.0
    max_request_bytes: int = 1_048_576
    # A gRPC connection is told to go away (GOAWAY) after about this many seconds,
    # so a long-lived client channel reconnects and spreads again over processes
    # and replicas; calls in flight get 70 s to finish. 0 keeps connections open.
    grpc_max_connection_age_seconds: float = 300.0
    # How long a verified API key is trusted without asking the database again.
    # A key rotated on this process stops working at once; on other replicas
    # within this many seconds. 0 checks every call.
    auth_cache_seconds: float = 5.0
    # Per-account REST request limit (a sliding minute, per process); the
    # default also applies per client IP to requests without a valid key.
    rate_limit_enabled: bool = True
    default_rate_limit_per_minute: int = 60
    default_active_cue_limit: int = 10
    default_monthly_execution_limit: int = 300
    worker_heartbeat_timeout_seconds: int = 180
    # A claim's lease (reported as lease_seconds); heartbeats extend it.
    worker_claim_lease_seconds: int = 900
    # How often a long-polling claim looks again for work no wake-up announced
    # (a send_at that came due; work from a replica it did not hear from).
    claim_recheck_seconds: float = 1.0
    # A worker execution nobody claims this long after it became claimable is missed.
    worker_unclaimed_timeout_seconds: int = 900
    # Callback URL safety switches for self-hosting and tests: admit loopback and
    # private targets, and plain http.
    allow_private_callbacks: bool = False
    allow_http_callbacks: bool = False
    # Webhook deliveries under way at once, and when a silent one counts as failed.
    delivery_concurrency: int = 200
    webhook_stale_after_seconds: int = 300
    # The scheduler's safety re-read of the schedule and housekeeping interval;
    # cues fire at their due time regardless.
    scheduler_poll_seconds: float = 1.0
    # PostgreSQL: how far ahead of their time cues are locked and their executions
    # inserted, so that at the due moment only the commit is left. 0 starts at the moment.
    scheduler_lead_seconds: float = 0.1
    # skip_missed fires the newest missed slot only when it is at most this old.
    catch_up_grace_seconds: int = 60
    # PostgreSQL connections per pool (transactions and single statements each have one).
    database_pool_size: int = 32
    # PostgreSQL: prepare the hot single statements on the server and run them with
    # their generic plans. Switch off behind a transaction-pooling proxy that does not
    # keep prepared statements (PgBouncer before 1.21) or refuses `options`.
    database_prepared_statements: bool = True
    # The event loop: "auto" (uvloop when it is installed, else asyncio's own),
    # "uvloop" or "asyncio".
    event_loop: str = "auto"
    log_level: str = "INFO"
    access_log: bool = False
    # Partner actions. The start of resolution links (https://cueline.example.com);
    # empty: http://HOST:HTTP_PORT of this process.
    public_base_url: str = ""
    # Action secret keys as `kid=base64url-key,kid2=...` (each key at least 32 random
    # bytes): all verify, the signing key id signs (default: the first). Empty: a
    # random key per process, so links die with it and differ between replicas.
    action_secret_keys: str = ""
    action_secret_signing_kid: str = ""
    # Comma-separated addresses or networks of reverse proxies whose
    # X-Forwarded-For is believed for the audit trail's remote address.
    trusted_proxies: str = ""

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'cueline.db'}"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from CUELINE_* variables, then apply non-None overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"CUELINE_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f.name, raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(name: str, raw: str, kind: Any) -> Any:
    kind = str(kind)
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
    except ValueError:
        raise SystemExit(f"CUELINE_{name.upper()}: cannot read {raw!r} as {kind}") from None
    return raw
