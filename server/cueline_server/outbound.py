"""Outbound HTTP/1.1 for webhooks: h11 over asyncio streams, with keep-alive.

The dispatcher sends one small request per delivery and reads at most a
bounded piece of the answer, to an address it has already checked. A
general-purpose client costs about a millisecond and a half of CPU per such
request here, which at a few hundred deliveries a second is a large share of
one core; this one costs a fraction of that. It connects to the given address
only (never resolving the host again), sends the URL's host in `Host` and, for
https, as the TLS server name, verified against the certificate.

Idle connections are kept per (scheme, address, port, host) for a few seconds
and reused. A request that fails on a reused connection before any response
arrived (the receiver closed it while idle) is sent once more on a new one;
webhook delivery is at-least-once, so a rare repeat is within the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import h11

KEEP_IDLE_SECONDS = 5.0
IDLE_PER_ORIGIN = 64
READ_CHUNK = 65536
# Headers the client itself sets from the request: a caller's copy would break the framing.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "host"})


@dataclass(frozen=True)
class Origin:
    """Where a request goes: the checked address to connect to, the `Host`
    header, and for https the name the certificate must carry."""

    scheme: str
    address: str
    port: int
    host: str
    server_name: str


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes  # at most the read limit


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    def usable(self, moment: float) -> bool:
        return (
            moment - self.idle_since < KEEP_IDLE_SECONDS
            and not self.reader.at_eof()
            and not self.writer.is_closing()
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class StaleConnection(Exception):
    """A reused connection failed before any response: try a new one."""


class HttpClient:
    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._idle: dict[Origin, list[_Connection]] = {}
        self._swept = time.monotonic()

    def _context(self) -> ssl.SSLContext:
        if self._tls is None:
            try:
                import certifi

                self._tls = ssl.create_default_context(cafile=certifi.where())
            except ImportError:  # pragma: no cover - certifi comes with the HTTP stack
                self._tls = ssl.create_default_context()
        return self._tls

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | None,
        read_limit: int,
    ) -> Response:
        """One request; the caller bounds the time (asyncio.timeout)."""
        fields: dict[str, tuple[str, str]] = {"host": ("Host", origin.host)}
        for name, value in headers.items():
            if name.lower() not in _FRAMING or name.lower() == "host":
                fields[name.lower()] = (name, value)
        if body is not None:
            fields["content-length"] = ("Content-Length", str(len(body)))
        request = h11.Request(method=method, target=target, headers=list(fields.values()))
        reused = self._checkout(origin)
        if reused is not None:
            try:
                return await self._exchange(origin, reused, request, body, read_limit, reused=True)
            except StaleConnection:
                pass
        connection = await self._connect(origin)
        return await self._exchange(origin, connection, request, body, read_limit, reused=False)

    async def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    def _checkout(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        moment = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable(moment):
                return connection
            connection.close()
        return None

    def _checkin(self, origin: Origin, connection: _Connection) -> None:
        moment = time.monotonic()
        connection.idle_since = moment
        idle = self._idle.setdefault(origin, [])
        if len(idle) < IDLE_PER_ORIGIN:
            idle.append(connection)
        else:
            connection.close()
        if moment - self._swept > KEEP_IDLE_SECONDS:
            self._swept = moment
            for key, connections in list(self._idle.items()):
                kept = []
                for each in connections:
                    if each.usable(moment):
                        kept.append(each)
                    else:
                        each.close()
                if kept:
                    self._idle[key] = kept
                else:
                    del self._idle[key]

    async def _connect(self, origin: Origin) -> _Connection:
        if origin.scheme == "https":
            reader, writer = await asyncio.open_connection(
                origin.address, origin.port, ssl=self._context(), server_hostname=origin.server_name
            )
        else:
            reader, writer = await asyncio.open_connection(origin.address, origin.port)
        return _Connection(reader, writer)

    async def _exchange(
        self,
        origin: Origin,
        connection: _Connection,
        request: h11.Request,
        body: bytes | None,
        read_limit: int,
        *,
        reused: bool,
    ) -> Response:
        protocol = connection.protocol
        keep = False
        answered = False
        try:
            data = protocol.send(request) or b""
            if body:
                data += protocol.send(h11.Data(data=body)) or b""
            data += protocol.send(h11.EndOfMessage()) or b""
            connection.writer.write(data)
            status = 0
            chunks: list[bytes] = []
            size = 0
            while True:
                event = protocol.next_event()
                if event is h11.NEED_DATA:
                    received = await connection.reader.read(READ_CHUNK)
                    if not received and reused and not answered:
                        raise StaleConnection
                    protocol.receive_data(received)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    answered = True
                elif isinstance(event, h11.Data):
                    chunks.append(event.data)
                    size += len(event.data)
                    if size >= read_limit:
                        break
                elif isinstance(event, h11.EndOfMessage):
                    keep = protocol.our_state is h11.DONE and protocol.their_state is h11.DONE
                    break
                else:  # ConnectionClosed or PAUSED
                    break
            return Response(status, b"".join(chunks)[:read_limit])
        except (OSError, h11.RemoteProtocolError) as exc:
            if reused and not answered:
                raise StaleConnection from exc
            raise
        finally:
            if keep:
                protocol.start_next_cycle()
                self._checkin(origin, connection)
            else:
                connection.close()
