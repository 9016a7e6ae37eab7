"""HTTP/1.1 over a raw socket: send exact bytes, read strictly parsed answers, with deadlines.

Hostile-input tests need to send what no client library would (STYLE 8, after uvicorn's
`tests/protocols/test_http.py`), and to notice an answer that is not well-formed HTTP instead
of having a lenient client paper over it. Every read has a deadline; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DEADLINE = 10.0

_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) ([\t !-~\x80-\xff]*)")
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[\t ]*([\t !-~\x80-\xff]*?)[\t ]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]+)(;[^\r\n]*)?")
_MAX_HEAD = 1024 * 1024


class MalformedResponseError(AssertionError):
    """The server answered with bytes that are not a well-formed HTTP/1.1 response."""


@dataclass(frozen=True)
class RawResponse:
    """One parsed response: status, headers as sent (names lowercased), the decoded body."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    interim: tuple[int, ...] = ()  # statuses of 1xx responses that came first

    def values(self, name: str) -> list[bytes]:
        wanted = name.lower().encode()
        return [value for header, value in self.headers if header == wanted]

    def header(self, name: str) -> bytes | None:
        found = self.values(name)
        if len(found) > 1:
            raise MalformedResponseError(f"{name} repeated: {found}")
        return found[0] if found else None

    def json(self) -> Any:
        return json.loads(self.body)


def assert_proxy_error(response: RawResponse, status: int, code: str) -> None:
    """`response` is one of the proxy's own errors: `status`, the OpenAI shape, `code`."""
    assert response.status == status, response
    assert response.header("content-type") == b"application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["param"] is None


class RawConnection:
    """One client connection that writes exact bytes and reads responses one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def read_response(self, deadline: float = DEADLINE, *, head: bool = False) -> RawResponse:
        """The next final response (1xx ones are collected); `head` for a HEAD request."""
        async with asyncio.timeout(deadline):
            interim: list[int] = []
            while True:
                status, reason, headers = await self._read_head()
                if 100 <= status < 200 and status != 101:
                    interim.append(status)
                    continue
                body = await self._read_body(status, headers, head)
                return RawResponse(status, reason, headers, body, tuple(interim))

    async def closed_by_peer(self, deadline: float = DEADLINE) -> bool:
        """Whether the server closes the connection (True) rather than sending more bytes."""
        async with asyncio.timeout(deadline):
            try:
                extra = await self._reader.read(1)
            except ConnectionResetError:
                return True
        return extra == b""

    async def close(self) -> None:
        self._writer.close()
        # The server may already have reset it; nothing is left to release then.
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), timeout=DEADLINE)

    async def _read_head(self) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        try:
            raw = await self._reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as error:
            raise MalformedResponseError(
                f"connection closed mid-head: {error.partial[:300]!r}"
            ) from None
        except asyncio.LimitOverrunError:
            raise MalformedResponseError("response head over the reader's limit") from None
        lines = raw[:-4].split(b"\r\n")
        status_line = _STATUS_LINE.fullmatch(lines[0])
        if status_line is None:
            raise MalformedResponseError(f"bad status line {lines[0][:300]!r}")
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            header = _HEADER_LINE.fullmatch(line)
            if header is None:
                raise MalformedResponseError(f"bad header line {line[:300]!r}")
            headers.append((header[1].lower(), header[2]))
        return int(status_line[1]), status_line[2], headers

    async def _read_body(
        self, status: int, headers: list[tuple[bytes, bytes]], head: bool
    ) -> bytes:
        if head or status in (204, 304) or 100 <= status < 200:
            return b""
        framing = {name: value for name, value in headers if name in _FRAMING}
        lengths = [value for name, value in headers if name == b"content-length"]
        if b"transfer-encoding" in framing:
            if lengths:
                raise MalformedResponseError("both Content-Length and Transfer-Encoding")
            if framing[b"transfer-encoding"].lower() != b"chunked":
                raise MalformedResponseError(f"transfer coding {framing[b'transfer-encoding']!r}")
            return await self._read_chunked()
        if lengths:
            if len(lengths) > 1 or not lengths[0].isdigit():
                raise MalformedResponseError(f"bad Content-Length {lengths}")
            try:
                return await self._reader.readexactly(int(lengths[0]))
            except asyncio.IncompleteReadError as error:
                raise MalformedResponseError(
                    f"body cut at {len(error.partial)} of {int(lengths[0])} bytes"
                ) from None
        return await self._reader.read()  # delimited by the end of the connection

    async def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        try:
            while True:
                size_line = (await self._reader.readuntil(b"\r\n"))[:-2]
                size = _CHUNK_SIZE.fullmatch(size_line)
                if size is None:
                    raise MalformedResponseError(f"bad chunk size line {size_line[:100]!r}")
                if int(size[1], 16) == 0:
                    while await self._reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailer fields
                    return b"".join(parts)
                parts.append(await self._reader.readexactly(int(size[1], 16)))
                if await self._reader.readexactly(2) != b"\r\n":
                    raise MalformedResponseError("chunk not followed by CRLF")
        except asyncio.IncompleteReadError:
            raise MalformedResponseError("connection closed inside a chunked body") from None


_FRAMING = frozenset({b"transfer-encoding", b"content-length"})


@asynccontextmanager
async def connect(url: str, deadline: float = DEADLINE) -> AsyncIterator[RawConnection]:
    """A raw connection to the server at `url` (`http://host:port`, any path ignored)."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    async with asyncio.timeout(deadline):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=_MAX_HEAD)
    connection = RawConnection(reader, writer)
    try:
        yield connection
    finally:
        await connection.close()


async def exchange(url: str, data: bytes, deadline: float = DEADLINE) -> RawResponse:
    """Send `data` on a new connection and read the one response it gets."""
    async with connect(url, deadline) as connection:
        await connection.send(data)
        return await connection.read_response(deadline)


def request_bytes(
    method: str,
    target: str | bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    *,
    host: bytes | None = b"proxy.test",
    content_length: bool = True,
) -> bytes:
    """Exact request bytes: request line, `Host` (unless None), `headers`, Content-Length."""
    target_bytes = target.encode() if isinstance(target, str) else target
    lines = [method.encode() + b" " + target_bytes + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += [name + b": " + value for name, value in headers or []]
    if content_length and (body or method in ("POST", "PUT", "PATCH")):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
