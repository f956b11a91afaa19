"""Callback URL safety (contract §5.10): which outbound targets cueline calls.

At create/update a URL must be absolute http(s) without credentials, name a
host, and not name or resolve to a blocked address (400 invalid_callback_url);
a host that does not resolve yet is accepted. At every delivery the host is
resolved again and the connection goes only to an address that passed, so a
DNS answer cannot change between the check and the connection.

Two switches serve self-hosting and tests: allow_private_callbacks admits
loopback, private and shared (100.64/10) addresses; allow_http_callbacks admits
plain http. Link-local, metadata hosts, multicast and reserved ranges stay
blocked whatever the switches say.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from cueline_server.errors import ApiError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_ALWAYS_BLOCKED = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "169.254.0.0/16", "192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24",
        "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "::/128", "fe80::/10", "ff00::/8", "2001:db8::/32",
        "100::/64",
    )
]  # fmt: skip
_PRIVATE = [
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::1/128",
        "fc00::/7",
    )
]
_METADATA_HOSTS = {"metadata.google.internal", "metadata.internal"}
RESOLVE_TIMEOUT = 5.0
_EMBEDDED_V4 = [ipaddress.ip_network("::ffff:0:0/96"), ipaddress.ip_network("64:ff9b::/96")]


def split_url(url: str) -> SplitResult | None:
    """The URL's parts, or None when they cannot be read: an invalid or unclosed
    IPv6 bracket, a port that is not a number from 0 to 65535."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (reading it checks it)
    except ValueError:
        return None
    return parts


class BlockedTarget(Exception):
    """A delivery-time block: counts as a failed attempt."""


@dataclass(frozen=True)
class CallbackPolicy:
    allow_private: bool = False
    allow_http: bool = False

    def blocked(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address):
            for network in _EMBEDDED_V4:
                if address in network:
                    return self.blocked(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if any(address in network for network in _ALWAYS_BLOCKED):
            return True
        return not self.allow_private and any(address in network for network in _PRIVATE)

    async def check(self, url: str, field: str = "callback.url") -> None:
        """The create/update check; raises 400 invalid_callback_url."""

        def refuse(message: str) -> ApiError:
            prefix = "on_failure.webhook: " if field == "on_failure.webhook" else ""
            return ApiError("invalid_callback_url", prefix + message, 400)

        parts = split_url(url)
        if parts is None:
            raise refuse("URL is malformed")
        scheme = parts.scheme.lower()
        if scheme != "https" and not (scheme == "http" and self.allow_http):
            raise refuse("URL must use https://")
        if parts.username is not None or parts.password is not None:
            raise refuse("Credentials in callback URLs are not allowed")
        host = (parts.hostname or "").lower()
        if not host:
            raise refuse("URL must have a hostname")
        if host in _METADATA_HOSTS or (host == "localhost" and not self.allow_private):
            raise refuse("Hostname is not allowed")
        if any(self.blocked(a) for a in await _addresses(host)):  # unresolvable: accepted
            raise refuse("Callback URL resolves to blocked address range")

    async def target(self, url: str) -> IPAddress:
        """The delivery check: the address to connect to, or BlockedTarget."""
        host = (urlsplit(url).hostname or "").lower()
        if not host or host in _METADATA_HOSTS or (host == "localhost" and not self.allow_private):
            raise BlockedTarget(host)
        addresses = await _addresses(host)
        if not addresses:
            raise ConnectionError(f"cannot resolve {host}")
        if any(self.blocked(a) for a in addresses):
            raise BlockedTarget(host)
        return addresses[0]


async def _addresses(host: str) -> list[IPAddress]:
    """The host's addresses (an IP literal is its own); [] when it does not resolve."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
    except (OSError, UnicodeError, TimeoutError):
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
