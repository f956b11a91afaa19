"""A lean HTTP/1.1 client for the REST load (asyncio streams), on a kept
connection or a new one per request.

A general-purpose client such as httpx spends more CPU per request than the
server's REST path does, and the load generator shares the machine's cores
with the server, so it would measure itself. This one sends prepared request
bytes and reads a status line, headers and a Content-Length body; nothing
else (no redirects, no chunked bodies, no TLS), which is all the benchmark
needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any


class Connection:
    @classmethod
    def to(cls, base_url: str, key: str, *, keep_alive: bool = True) -> Connection:
        """A connection to a server's REST port (`http://host:port`) with an API key."""
        host, port = base_url.removeprefix("http://").split(":")
        return cls(host, int(port), {"Authorization": f"Bearer {key}"}, keep_alive=keep_alive)

    def __init__(self, host: str, port: int, headers: dict[str, str], *, keep_alive: bool = True) -> None:
        """Without `keep_alive`, every request opens a connection of its own and
        closes it after the response, as a one-shot client does."""
        self._host, self._port = host, port
        self._keep_alive = keep_alive
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """(status, body). On a kept connection it reconnects once if the server
        had closed it; a new connection per request is tried once."""
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\n{self._fixed}"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        retry = self._keep_alive
        while True:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
            assert self._reader is not None
            try:
                self._writer.write(head.encode() + payload)
                answer = await self._response(self._reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if not retry:
                    raise
                retry = False
                continue
            if not self._keep_alive:
                await self.close()
            return answer

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        status_line = await reader.readuntil(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        return status, await reader.readexactly(length) if length else b""

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        self._reader = self._writer = None
