"""A minimal Redis client for the limiter (DESIGN §11): one connection, pipelined, asyncio.

The limiter needs one command, `EVALSHA` (with `EVAL` when the server has not seen the script),
on the request path of every limited request. redis-py's asyncio client costs ~70 µs of CPU
per call (a connection pool, a lock, its parsers); this one writes each command on one
connection and matches replies in order, ~16 µs (measured with 64 calls in flight, issue 13's
bench). Replies of calls that timed out are still read and dropped, so the order holds.

URLs: `redis://[[user]:password@]host[:port][/db]`, `rediss://...` (TLS, verified),
`unix:///path/to/socket[?db=N]`. A lost connection fails the calls in flight; the next call
connects again, so counting resumes when Redis is back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


class RedisError(Exception):
    """A Redis error reply (`-ERR ...`), or the connection failing."""


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where the server is and how to log in."""

    host: str | None  # None: a unix socket
    port: int
    path: str | None
    tls: bool
    username: str | None
    password: str | None
    db: int

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """The address a URL names; ValueError for a database that is not a whole number."""
        parts = urlsplit(url)
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        # The database: `/N` of a TCP URL, else `?db=N` (a unix socket's path is the socket),
        # as redis-py reads them.
        queried = parse_qs(parts.query).get("db", [""])[-1]
        if parts.scheme == "unix":
            return cls(None, 0, parts.path, False, username, password, _database(queried))
        return cls(
            parts.hostname or "localhost",
            parts.port or 6379,
            None,
            parts.scheme == "rediss",
            username,
            password,
            _database(parts.path[1:] or queried),
        )


def _database(text: str) -> int:
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()):  # not -1, 1.5, 0/1 (SELECT would refuse them)
        raise ValueError("has a database number that is not a whole number >= 0")
    return int(text)


def encode_command(*args: bytes | str | int | float) -> bytes:
    """A command as RESP: an array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(encode_bulk(arg) for arg in args)


def encode_bulk(arg: bytes | str | int | float) -> bytes:
    """One argument as a RESP bulk string."""
    data = arg if isinstance(arg, bytes) else str(arg).encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


class _IncompleteReplyError(Exception):
    """The buffer ends inside a reply."""


def parse_reply(data: bytes, at: int) -> tuple[Any, int]:
    """One RESP2 reply starting at `at`: (value, the offset after it). Errors are returned as
    RedisError objects, not raised: they belong to their call."""
    end = data.find(b"\r\n", at)
    if end == -1:
        raise _IncompleteReplyError
    kind, line = data[at : at + 1], data[at + 1 : end]
    after = end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        size = int(line)
        if size == -1:
            return None, after
        if len(data) < after + size + 2:
            raise _IncompleteReplyError
        return data[after : after + size], after + size + 2
    if kind == b"*":
        count = int(line)
        if count == -1:
            return None, after
        items = []
        for _ in range(count):
            item, after = parse_reply(data, after)
            items.append(item)
        return items, after
    raise RedisError(f"not a Redis reply (starts with {kind!r})")


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._buffer = b""
        self.closed = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def call(self, command: bytes) -> asyncio.Future[Any]:
        assert self.transport is not None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.write(command)
        return future

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        at = 0
        while at < len(buffer):
            try:
                value, at_next = parse_reply(buffer, at)
            except _IncompleteReplyError:
                break
            except (RedisError, ValueError) as error:
                self._fail(RedisError(f"cannot read Redis's reply: {error}"))
                return
            at = at_next
            if not self.waiting:
                continue  # nothing asked for it (a push from the server): dropped
            future = self.waiting.popleft()
            if not future.done():  # a call that timed out is done (cancelled) already
                future.set_result(value)
        self._buffer = buffer[at:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisError(f"the connection to Redis was lost ({exc or 'closed'})"))
        if not self.lost.done():
            self.lost.set_result(None)

    def _fail(self, error: RedisError) -> None:
        self.closed = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()


class RedisClient:
    """Calls scripts on one pipelined connection, connecting again when it is lost."""

    def __init__(self, url: str) -> None:
        self._address = RedisAddress.from_url(url)
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    async def call(self, command: bytes) -> Any:
        """The reply to one encoded command; an error reply is returned as a RedisError."""
        connection = await self._ready()
        return await connection.call(command)

    async def evalsha(
        self, sha: str, script: str, keys: list[str], args: list[str | int | float]
    ) -> Any:
        """The script's reply (by its SHA-1; sent whole once if the server lacks it)."""
        connection = await self._ready()
        reply = await connection.call(encode_command("EVALSHA", sha, len(keys), *keys, *args))
        if isinstance(reply, RedisError) and str(reply).startswith("NOSCRIPT"):
            reply = await connection.call(encode_command("EVAL", script, len(keys), *keys, *args))
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def _ready(self) -> _Connection:
        connection = self._connection
        if connection is not None and not connection.closed:
            return connection
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        # Shielded: a call that times out must not cancel the connecting others wait for.
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        address = self._address
        try:
            if address.path is not None:
                _, connection = await loop.create_unix_connection(_Connection, address.path)
            else:
                context = ssl.create_default_context() if address.tls else None
                _, connection = await loop.create_connection(
                    _Connection, address.host or "localhost", address.port, ssl=context
                )
        except OSError as error:
            raise RedisError(f"cannot connect to Redis ({error.strerror or error})") from None
        greeting = []
        if address.password is not None:
            login = (
                (address.username, address.password) if address.username else (address.password,)
            )
            greeting.append(connection.call(encode_command("AUTH", *login)))
        if address.db:
            greeting.append(connection.call(encode_command("SELECT", address.db)))
        for reply in greeting:
            answer = await reply
            if isinstance(answer, RedisError):
                connection._fail(answer)
                raise RedisError(f"Redis refused the login or the database: {answer}")
        # Set here, not by whoever awaited: a call arriving between this task's end and its
        # awaiters' turns would otherwise find no connection and open a second one.
        self._connection = connection
        return connection

    async def close(self) -> None:
        """Close the connection and wait (briefly) until it is gone: the loop may end next."""
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        connection = self._connection
        if connection is not None and connection.transport is not None:
            connection.transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(connection.lost)
