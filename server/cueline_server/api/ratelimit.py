"""Request rate limiting for the REST surface (contract §2.10).

Each account may make `rate_limit_per_minute` requests in a sliding 60 s
window; requests without a valid API key (register, bad or missing keys)
count per client IP against `CUELINE_DEFAULT_RATE_LIMIT_PER_MINUTE`. A refused
request is not counted. Every counted response carries X-RateLimit-Limit,
X-RateLimit-Remaining and X-RateLimit-Reset; a refusal is 429
`rate_limit_exceeded` with an integer `Retry-After` >= 1.

The window is kept per key as counts per whole second, so memory per key is
bounded by the window length, whatever the limit, and keys idle for a whole
window are dropped. The state lives in this process: N replicas allow up to
N times the limit. gRPC calls and the partner surface are not limited (see
docs/contract-notes.md), except what needs no credentials and costs the
server: registering, and the partner token grants, on either transport.
"""

from __future__ import annotations

import collections
import math
import threading
import time
import uuid
from collections.abc import Callable, Hashable, MutableMapping
from dataclasses import dataclass
from typing import Any

from cueline_server.api.transcoder import Networks, Receive, Scope, Send, client_address, error_response
from cueline_server.errors import rate_limit_exceeded
from cueline_server.services.accounts import Authenticator

WINDOW_SECONDS = 60
# Paths never limited and never given the headers: the probes and the API description.
EXEMPT_PATHS = frozenset({"/health", "/status", "/healthz", "/openapi.json"})
# The partner surface has no rate limit in its contract; partners reach it per organization.
UNLIMITED_PREFIXES = ("/api/partners/", "/oauth2/")
# Except its credential endpoints: one budget per client IP for both, at the default limit, since
# every password guess costs a PBKDF2 hash. Refusals use the surface's error style.
CREDENTIAL_PATHS = frozenset({"/api/partners/v2.0/auth/token", "/oauth2/token"})


@dataclass(frozen=True)
class Quota:
    """The outcome of one request against its key's window."""

    limit: int
    remaining: int
    reset: int  # epoch second at which the oldest counted request leaves the window
    retry_after: int | None  # set when the request was refused

    @property
    def allowed(self) -> bool:
        return self.retry_after is None

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"x-ratelimit-limit", str(self.limit).encode()),
            (b"x-ratelimit-remaining", str(self.remaining).encode()),
            (b"x-ratelimit-reset", str(self.reset).encode()),
        ]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        return headers


class _Window:
    """Counted requests of one key: (second, count) pairs, oldest first, and their sum."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: collections.deque[list[int]] = collections.deque()
        self.total = 0

    def expire(self, second: int, window: int) -> None:
        """Drop the seconds that are no longer within `window` seconds of `second`."""
        while self.buckets and self.buckets[0][0] <= second - window:
            self.total -= self.buckets.popleft()[1]

    def add(self, second: int) -> None:
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += 1
        else:
            self.buckets.append([second, 1])
        self.total += 1

    def room_at(self, limit: int, window: int) -> int:
        """The first second at which fewer than `limit` requests remain counted."""
        left = self.total
        for second, count in self.buckets:
            left -= count
            if left < limit:
                return second + window
        raise AssertionError("only a window holding at least `limit` requests has no room")


class SlidingWindowLimiter:
    """A sliding window per key at one-second resolution, safe to share
    between threads and tasks (a check never awaits, and a lock guards it)."""

    def __init__(
        self,
        window_seconds: int = WINDOW_SECONDS,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._window = window_seconds
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # Least recently used first, so idle keys are found at the front.
        self._windows: collections.OrderedDict[Hashable, _Window] = collections.OrderedDict()

    def hit(self, key: Hashable, limit: int) -> Quota:
        """Count one request for `key` unless its window is full."""
        limit = max(limit, 1)
        now = self._clock()
        second = math.floor(now)
        with self._lock:
            self._forget_idle(second)
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window()
                if len(self._windows) > self._max_keys:
                    self._windows.popitem(last=False)
            else:
                self._windows.move_to_end(key)
                window.expire(second, self._window)
            if window.total >= limit:
                reset = window.room_at(limit, self._window)
                return Quota(limit, 0, reset, max(1, math.ceil(reset - now)))
            window.add(second)
            return Quota(limit, limit - window.total, window.buckets[0][0] + self._window, None)

    def usage(self, key: Hashable) -> int:
        """Requests counted for `key` in the current window."""
        second = math.floor(self._clock())
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                return 0
            window.expire(second, self._window)
            return window.total

    def account_usage(self, account_id: uuid.UUID) -> int:
        return self.usage(account_key(account_id))

    def tracked_keys(self) -> int:
        return len(self._windows)

    def _forget_idle(self, second: int) -> None:
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if window.buckets and window.buckets[-1][0] > second - self._window:
                return
            del self._windows[key]


# The budgets per client IP (the first element of a limiter key): requests
# without a valid API key, and the partner credential grants.
_PER_IP, _CREDENTIALS = "ip", "credentials"

# The gRPC methods that need no credentials and cost the server (a new account;
# a PBKDF2 hash per password guess), with the per-IP budget of their REST routes:
# a caller spends one budget whichever transport it uses.
GRPC_PER_IP = {
    "/cueline.v1.AccountService/Register": _PER_IP,
    "/cueline.partner.v1.PartnerAuthService/IssueToken": _CREDENTIALS,
    "/cueline.partner.v1.PartnerAuthService/IssueClientToken": _CREDENTIALS,
}


class GrpcRateLimit:
    """The per-IP budgets of GRPC_PER_IP for gRPC calls; other methods pass."""

    def __init__(self, limiter: SlidingWindowLimiter, default_limit: int) -> None:
        self._limiter = limiter
        self._default_limit = default_limit

    def check(self, method: str, address: str) -> None:
        """Count a call of `method` (a full name) from `address`; raises 429
        `rate_limit_exceeded` when its budget is spent."""
        kind = GRPC_PER_IP.get(method)
        if kind is None:
            return
        quota = self._limiter.hit((kind, address), self._default_limit)
        if quota.retry_after is not None:
            raise rate_limit_exceeded(quota.retry_after)


def account_key(account_id: uuid.UUID) -> Hashable:
    return ("account", account_id)


def _ip_key(scope: Scope, trusted_proxies: Networks) -> Hashable:
    return (_PER_IP, client_address(scope, trusted_proxies))


ASGIApp = Callable[[Scope, Receive, Send], Any]


class RestRateLimit:
    """ASGI middleware in front of the REST transcoder: counts each request
    against its account (or client IP), adds the headers to the response, or
    answers 429 itself."""

    def __init__(
        self,
        app: ASGIApp,
        limiter: SlidingWindowLimiter,
        authenticator: Authenticator,
        default_limit: int,
        trusted_proxies: Networks = (),
    ) -> None:
        self._app = app
        self._limiter = limiter
        self._authenticator = authenticator
        self._default_limit = default_limit
        self._trusted_proxies = trusted_proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _path(scope) if scope["type"] == "http" else ""
        if path in CREDENTIAL_PATHS:
            key: Hashable = (_CREDENTIALS, client_address(scope, self._trusted_proxies))
            limit = self._default_limit
        elif not path or path in EXEMPT_PATHS or path.startswith(UNLIMITED_PREFIXES):
            await self._app(scope, receive, send)
            return
        else:
            key, limit = await self._identify(scope)
        quota = self._limiter.hit(key, limit)
        if not quota.allowed:
            await _refuse(send, quota, path)
            return

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *quota.headers()]}
            await send(message)

        await self._app(scope, receive, send_with_headers)

    async def _identify(self, scope: Scope) -> tuple[Hashable, int]:
        """The caller's account and limit when its key is valid, else its IP and the default limit.

        The pipeline authenticates the request again (usually from the key
        cache) and answers a bad key or an unreachable database itself."""
        header = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), None)
        if header:
            try:
                caller = await self._authenticator.authenticate(header.decode("latin-1"))
            except Exception:
                return _ip_key(scope, self._trusted_proxies), self._default_limit
            return account_key(caller.account_id), caller.rate_limit_per_minute
        return _ip_key(scope, self._trusted_proxies), self._default_limit


def _path(scope: Scope) -> str:
    raw: str = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    path = raw.split("?", 1)[0]
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


async def _refuse(send: Send, quota: Quota, path: str) -> None:
    assert quota.retry_after is not None
    status, body, extra = error_response(path, rate_limit_exceeded(quota.retry_after))
    headers = [
        (b"x-request-id", str(uuid.uuid4()).encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
        *quota.headers(),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
