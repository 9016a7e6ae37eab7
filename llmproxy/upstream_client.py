"""The upstream HTTP/1.1 client: a pool of keep-alive connections, parsed by httptools.

Why not aiohttp: the proxy needs one narrow thing from a client (send a buffered request, hand
back the status, the raw headers and the body's bytes as they arrive), and aiohttp's general
machinery around that (sessions, cookies, URL objects, header multidicts, a task per request
body, trace hooks) was 40% of the proxy's CPU per request in the profile. This client does the
narrow thing with the same C parser uvicorn uses (llhttp, through httptools) and measured at a
fraction of that cost (README, "Design notes"). What it does not do, the proxy does not need:
redirects, cookies, decompression, proxies from the environment, HTTP/2.

Errors, in what the forwarder must tell apart (DESIGN §4, §6):
* `ConnectFailedError` (and its `ConnectTimeoutError`): the upstream never got the request;
* `ReadTimeoutError`: no byte for `read_timeout` seconds, before the headers or in the body
  (while a request is still being written: no byte of it taken for that long);
* `ConnectionClosedError`: the upstream closed the connection before any byte of its answer;
* `ResponseError`: the connection broke or the upstream sent something that is not HTTP/1.1.

Reuse and retry (DESIGN §13): an idle connection is handed out only while it is open and idle
for less than the keep-alive (or the upstream's shorter `Keep-Alive: timeout`). A reused one
that the upstream closes before answering is retried once, here, on a new connection, when
nothing of the request went out or the request may be replayed: Go's Transport rule
(`net/http/transport.go`, `persistConn.shouldRetryRequest`, `errServerClosedIdle`).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from llmproxy.bodies import StreamedBody
from llmproxy.egress import EgressProxy

# Below uvicorn's 5 s keep-alive default, the shortest idle timeout common among
# OpenAI-compatible servers (vLLM, LiteLLM): reusing a connection the upstream is about to
# close would fail a POST that nobody may safely retry.
KEEPALIVE_SECONDS = 4.0

# Upper bound on simultaneous upstream connections. Far above what one core serves, so the pool
# never queues requests under load; the count of open sockets stays bounded.
MAX_CONNECTIONS = 4096

# A response head larger than this is refused rather than held in memory.
MAX_HEAD_BYTES = 256 * 1024

# Bytes after a chunked body's data that are not body (the last chunk's trailer fields, a chunk
# line that never ends): httptools holds an unfinished field whole, so these must be bounded too.
MAX_TRAILER_BYTES = 64 * 1024

# Body bytes held for a slow client before reading from the upstream pauses, and where it resumes.
_PAUSE_ABOVE = 256 * 1024
_RESUME_BELOW = 64 * 1024

# What one read may carry past a head that just fits under MAX_HEAD_BYTES (body bytes, say).
_HEAD_READ_SLACK = 256 * 1024

# Bodies up to this size go out in the same write as the head.
_COALESCE_BODY_BELOW = 64 * 1024

# The transport's write buffer: above the high mark `pause_writing`, and `resume_writing` only once
# it is empty (low mark 0), which is when the request has been written whole.
_WRITE_HIGH_WATER = 64 * 1024

# How long an answered exchange whose request is still going out may wait for the write to end
# before its connection is closed instead of reused (Go: maxWriteWaitBeforeConnReuse, 50 ms).
_WRITE_GRACE_SECONDS = 0.05

# What may be sent again after a reused connection closed under it (RFC 9110 §9.2.2; Go's
# `Request.isReplayable` also counts an `Idempotency-Key` or `X-Idempotency-Key` header).
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_IDEMPOTENCY_KEYS = frozenset({"idempotency-key", "x-idempotency-key"})


class UpstreamError(Exception):
    """The exchange with the upstream failed."""

    # 1 when the request was sent again on a new connection (see `UpstreamClient.request`)
    # before failing like this: the access log line shows it.
    stale_retries = 0


class ConnectFailedError(UpstreamError):
    """No connection: refused, unresolvable, TLS failure. The upstream never got the request."""


class ConnectTimeoutError(ConnectFailedError):
    """The connection was not established within `connect_timeout`."""


class ReadTimeoutError(UpstreamError):
    """The upstream sent nothing for `read_timeout` seconds (before the headers or in the body)."""


class ResponseError(UpstreamError):
    """The connection broke, or the upstream's answer was not valid HTTP/1.1."""


class ConnectionClosedError(ResponseError):
    """The upstream closed the connection before sending any byte of its answer.

    `reused`: the connection had carried an exchange before (the upstream may have closed it
    as idle while this request was on its way). `nothing_written`: no byte of the request left.
    """

    def __init__(self, message: str, *, reused: bool, nothing_written: bool) -> None:
        super().__init__(message)
        self.reused = reused
        self.nothing_written = nothing_written


class EgressProxyError(ConnectFailedError):
    """The egress proxy could not be reached or refused the tunnel (DESIGN §12).

    The message names the proxy's host and port, never its credentials.
    """


class UnsendableRequestError(UpstreamError):
    """A header or the target holds a line break, so the request cannot be written safely.

    The server's parser and the configuration already refuse such values; this is the last
    guard before bytes go out, since a line break in a value would smuggle a header or request.
    """


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: scheme, host and port, and the `Host` header they carry."""

    scheme: str
    host: str
    port: int
    host_header: str
    # The egress proxy in between, or None (part of the pool's key: tunnels are pooled per
    # proxy and upstream origin, like any connection).
    via: EgressProxy | None = None

    @classmethod
    def from_url(cls, url: str) -> Origin:
        """The origin of an `http(s)://host[:port]/...` URL (validated by the configuration)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        default_port = 443 if parts.scheme == "https" else 80
        port = parts.port or default_port
        host = parts.hostname
        if not host.isascii():
            # Host and SNI carry A-labels (RFC 5890 §2.3.2.1). The stdlib codec is IDNA 2003,
            # the one Python's own resolver applies to a text host name: the name looked up is
            # the name sent. (IDNA 2008 differs for ß, ς and joiners: configure those as xn--.)
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError as error:
                raise ValueError(f"not a valid host name: {host!r} ({error})") from None
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default_port else f"{shown}:{port}"
        return cls(parts.scheme, host, port, host_header)


class UpstreamResponse:
    """One response: status and raw headers at once, the body's chunks as they arrive.

    Iterate it (`async for chunk in response`) for the body, de-chunked; then `close()` it,
    which returns a fully read connection to the pool and aborts any other.
    """

    __slots__ = ("_connection", "names", "raw_headers", "stale_retries", "status")

    def __init__(
        self,
        connection: _Connection,
        status: int,
        raw_headers: list[Any],
        names: list[bytes] | None = None,
    ) -> None:
        self._connection = connection
        self.status = status
        self.raw_headers: list[tuple[bytes, bytes]] = raw_headers
        # The names lowercased, in the same order: lowered once per response, not per lookup.
        self.names = [name.lower() for name, _ in raw_headers] if names is None else names
        # 1 when a reused connection closed under the request and it went out again on a new
        # one (`UpstreamClient.request`): the access log line shows it.
        self.stale_retries = 0

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lowercase), or None."""
        names = self.names
        return self.raw_headers[names.index(name)][1] if name in names else None

    def headers_as_text(self) -> dict[str, str]:
        """The headers as a lowercase-keyed dict of text (first value wins), for retry policy."""
        headers: dict[str, str] = {}
        for key, value in self.raw_headers:
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        return headers

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._connection.read_chunk()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def read_chunk(self) -> bytes:
        """The next body bytes, or b"" once the body is complete."""
        return await self._connection.read_chunk()

    def close(self) -> None:
        """Give the connection back: to the pool if the body was read whole, else abort it."""
        self._connection.finish()


class _Connection(asyncio.Protocol):
    """One upstream connection and the one exchange it carries at a time."""

    def __init__(self, pool: _Pool, read_timeout: float) -> None:
        self._pool = pool
        self._read_timeout = read_timeout
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0  # 0.0 until the first exchange ends: the connection was never reused
        self.idle_until = 0.0  # while idle, reused only before this (set by the pool)
        self.closed = False
        # The upstream's `Keep-Alive: timeout=N` on the last response (None: it gave none).
        self.keepalive_hint: float | None = None
        self._chunks: collections.deque[bytes] = collections.deque()  # cleared per exchange
        # Transport state, not the exchange's: the request's bytes still in the write buffer
        # above the high mark (`pause_writing`), their count at the last check of the timer, and
        # an answered exchange waiting for its request to be written out before reuse.
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None  # a streamed body waits here
        self._unsent = 0
        self._release_when_written: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None  # the read timeout's (see `_ensure_timer`)
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._head_bytes_received = 0  # all bytes before the final head, 1xx heads included
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._chunks.clear()
        self._buffered = 0
        self._chunk_waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._keep_alive = False  # the parser's verdict, taken when the message ends
        self._error: UpstreamError | None = None
        self._head_only = False  # a HEAD request: no body, whatever the headers say
        self._ends_at_eof = False  # a body delimited by the connection's close
        self._tail_bytes = 0  # bytes read since the last body data: chunk lines and trailers
        self._trailer_bytes = 0
        self._nothing_written = False  # the request's first write failed: no byte left
        self._body_unfinished = False  # answered before a streamed body was sent whole
        self._paused = False
        self._in_exchange = False
        self._last_data = 0.0

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._transport is None:
            # A stream transport (uvloop's are not asyncio.Transport subclasses).
            self._transport = cast(asyncio.Transport, transport)
            self._transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER, low=0)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        # The low mark is 0: the request has been written whole.
        self._write_paused = False
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)
        if self._in_exchange:
            self._last_data = self._loop.time()  # the wait for the answer starts now
        elif self._release_when_written is not None:
            self._release_when_written.cancel()
            self._release_when_written = None
            self._release()

    def data_received(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        if not self._in_exchange:
            self._fail_and_close(ResponseError("the upstream sent bytes outside an exchange"))
            return
        in_body = self._response is not None
        if not in_body:
            # httptools holds a header line until it ends, so `on_header` alone cannot bound
            # a head that never ends: count every byte that arrives before the final head.
            self._head_bytes_received += len(data)
            if self._head_bytes_received > MAX_HEAD_BYTES + _HEAD_READ_SLACK:
                self._fail_and_close(
                    ResponseError(f"the response head is over {MAX_HEAD_BYTES} bytes")
                )
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail_and_close(ResponseError("the upstream switched protocols"))
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            self._fail_and_close(
                cause if isinstance(cause, UpstreamError) else ResponseError(str(error))
            )
        except httptools.HttpParserError as error:
            self._fail_and_close(ResponseError(f"invalid HTTP response: {error}"))
        else:
            if not in_body:
                return
            # Trailers, like the head, are held by httptools until each field ends: complete
            # ones are counted in `on_header`; here, the bytes of one that does not end. Reads
            # since the last body data (`on_body` resets the count) are summed: the read that
            # also carried body counts whole, so the bound has one read of slack.
            self._tail_bytes += len(data)
            if self._tail_bytes > MAX_TRAILER_BYTES + _HEAD_READ_SLACK and not self._complete:
                self._fail_and_close(
                    ResponseError(f"the response trailers are over {MAX_TRAILER_BYTES} bytes")
                )

    def eof_received(self) -> bool | None:
        # Never handed out again from now on: `connection_lost` (which settles the exchange)
        # comes only a loop turn later, and a request taking this connection meanwhile fails.
        self.closed = True
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)  # the pump then finds the connection closed
        self.closed = True
        self._pool.forget(self)
        self._cancel_timer()
        if not self._in_exchange or self._complete or self._error is not None:
            return
        if exc is None and self._ends_at_eof and self._response is not None:
            self._message_complete()  # the close is how this body ends
            return
        reason = f": {exc}" if exc is not None else ""
        if self._response is None:
            if self._head_bytes_received:
                self._fail(ResponseError(f"the upstream closed the connection mid-head{reason}"))
                return
            self._fail(
                ConnectionClosedError(
                    f"the upstream closed the connection before answering{reason}",
                    reused=self.idle_since != 0.0,
                    nothing_written=self._nothing_written,
                )
            )
        else:
            self._fail(ResponseError(f"the upstream closed the connection mid-body{reason}"))

    # -- httptools callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._complete:
            # A message after the final response, in the read that ended it or a later one
            # while the response is still open: an answer to no request (a 1xx included, which
            # `on_headers_complete` would otherwise skip). The exchange stands; the connection
            # is closed, so that reuse does not depend on how the bytes were cut into reads.
            raise ResponseError("the upstream sent a message after the response")
        self._headers = []
        self._head_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._response is not None:
            # A trailer field: counted exactly, whatever reads it came in (the bytes of one
            # that never ends are bounded in `data_received`), and not kept.
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > MAX_TRAILER_BYTES:
                raise ResponseError(f"the response trailers are over {MAX_TRAILER_BYTES} bytes")
            return
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ResponseError(f"the response head is over {MAX_HEAD_BYTES} bytes")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._response is not None:
            raise ResponseError("the upstream sent a second response")  # 1xx included
        status = self._parser.get_status_code()
        if not 100 <= status < 600:
            # llhttp takes any three digits. RFC 9110 §15: codes outside 100-599 are invalid,
            # and a client SHOULD process such a response as a 5xx; for a gateway that is a
            # 502 (upstream_bad_response). 600-999 too (h11 and llhttp accept them): the RFC
            # names them as libraries' internal codes, not answers; relayed, they would reach
            # SDKs that classify answers by range, and no retry status can name them
            # (`retry_statuses` are 400-599). A single O(1) check per head.
            raise ResponseError(f"the upstream sent status {status:03d}, outside 100-599")
        if status < 200:
            return  # informational (100 Continue, 103 Early Hints): the real answer follows
        headers = self._headers
        self._headers = []  # a chunked body's trailers, if any, go here, not into the response
        names = [name.lower() for name, _ in headers]
        if not self._head_only:  # (HEAD answers end here, and their connections are not reused)
            self._ends_at_eof, self.keepalive_hint = _response_framing(status, headers, names)
        response = UpstreamResponse(self, status, headers, names)
        self._response = response
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if self._head_only:
            self._message_complete()

    def on_body(self, body: bytes) -> None:
        if self._head_only or self._complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        self._tail_bytes = 0
        if self._buffered > _PAUSE_ABOVE and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake_reader()

    def on_message_complete(self) -> None:
        if self._response is None:
            return  # the end of an informational response
        # Asked here, not in `finish`: once the message is over, llhttp has reset its framing
        # flags and `should_keep_alive()` answers False for every Content-Length or chunked
        # body (as if it ended at EOF), so such connections were never reused.
        self._keep_alive = self._parser.should_keep_alive()
        if not self._complete:
            self._message_complete()

    # -- the exchange ------------------------------------------------------------------------
    async def send(self, head: bytes, body: bytes, head_only: bool) -> UpstreamResponse:
        """Write the request and wait for the response's head."""
        assert self._transport is not None
        self._reset_exchange()
        self._in_exchange = True
        self._head_only = head_only
        waiter: asyncio.Future[UpstreamResponse] = self._loop.create_future()
        self._head_waiter = waiter
        transport = self._transport
        # A write that fails at once (the upstream reset the connection) closes the transport
        # before it returns, and no byte of it left: so nothing was written if it is closing
        # after the first write (the pool hands out no closing connection).
        if body and len(body) < _COALESCE_BODY_BELOW:
            transport.write(head + body)
            self._nothing_written = transport.is_closing()
        else:
            transport.write(head)
            self._nothing_written = transport.is_closing()
            if body:
                transport.write(body)
        if self._write_paused:  # the timer watches the rest go out (`_check_silence`)
            self._unsent = transport.get_write_buffer_size()
        self._last_data = self._loop.time()
        self._ensure_timer()
        try:
            return await waiter
        except BaseException:
            self.abort()  # cancelled (the client left) or failed: this connection is done
            raise
        finally:
            self._head_waiter = None

    async def send_streamed(self, head: bytes, body: StreamedBody) -> UpstreamResponse:
        """Write the head, then the body as the client sends it; the response's head.

        The body is pumped by a task of its own, so an answer that comes first (an early 413)
        is returned at once: the rest of the body is not sent, and the connection is closed
        when the exchange ends.
        """
        assert self._transport is not None
        self._reset_exchange()
        self._in_exchange = True
        waiter: asyncio.Future[UpstreamResponse] = self._loop.create_future()
        self._head_waiter = waiter
        self._transport.write(head)
        self._nothing_written = self._transport.is_closing()
        pump = self._loop.create_task(self._pump(body))
        try:
            await asyncio.wait((waiter, pump), return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():  # answered before the body was whole
                self._body_unfinished = True
                pump.cancel()
                return waiter.result()
            pump.result()  # the client's failures (gone, over the limit) raise here
            if self._write_paused:
                self._unsent = self._transport.get_write_buffer_size()
            self._last_data = self._loop.time()  # the wait for the answer starts now
            self._ensure_timer()
            return await waiter
        except BaseException:
            pump.cancel()
            if not waiter.done():
                waiter.cancel()  # nobody will wait for the head now: abort must not fail it
            self.abort()
            raise
        finally:
            self._head_waiter = None

    async def _pump(self, body: StreamedBody) -> None:
        transport = self._transport
        assert transport is not None
        chunked = body.length is None
        async for part in body:
            if self.closed:
                raise ConnectionClosedError(
                    "the upstream closed the connection during the request body",
                    reused=False,
                    nothing_written=False,
                )
            transport.write(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
            if self._write_paused:  # the upstream reads slower: so does the client
                drain = self._drain_waiter = self._loop.create_future()
                try:
                    # An upstream that takes no byte for the read timeout is as silent as one
                    # that sends none (the read timer starts only once the body is sent).
                    async with asyncio.timeout(self._read_timeout):
                        await drain
                except TimeoutError:
                    raise ReadTimeoutError(
                        f"the upstream took no request body bytes for {self._read_timeout:g} s"
                    ) from None
                finally:
                    self._drain_waiter = None
        if chunked:
            transport.write(b"0\r\n\r\n")

    async def read_chunk(self) -> bytes:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < _RESUME_BELOW and self._transport is not None:
                    self._paused = False
                    self._last_data = self._loop.time()  # the silence was ours, not theirs
                    self._transport.resume_reading()
                return chunk
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            waiter = self._loop.create_future()
            self._chunk_waiter = waiter
            try:
                await waiter
            finally:
                self._chunk_waiter = None

    def finish(self) -> None:
        """End of the exchange: back to the pool if it ended cleanly, else closed."""
        if not self._in_exchange:
            return
        reusable = (
            self._complete
            and self._error is None
            and not self._body_unfinished
            and not self._head_only
            and not self._ends_at_eof
            and not self.closed
            and self._keep_alive
        )
        self._in_exchange = False
        self._response = None
        if not reusable:
            self.abort()
        elif self._write_paused or (
            self._transport is not None and self._transport.get_write_buffer_size()
        ):
            # Answered before the request was written whole (an early 413, say): the next
            # request would queue behind the rest, which the upstream may never read. Reused
            # only if the write ends within the grace (`resume_writing`), else closed (Go's
            # persistConn: maxWriteWaitBeforeConnReuse).
            self._release_when_written = self._loop.call_later(
                _WRITE_GRACE_SECONDS, self._write_grace_over
            )
        else:
            self._release()

    def _release(self) -> None:
        if self._paused and self._transport is not None:
            # The body came whole but was left unread: the next exchange must read again.
            self._paused = False
            self._transport.resume_reading()
        self._pool.release(self)

    def _write_grace_over(self) -> None:
        self._release_when_written = None
        if (
            not self.closed
            and self._transport is not None
            and not self._transport.get_write_buffer_size()
        ):
            self._write_paused = False  # below the high mark, so `resume_writing` never came
            self._release()
        else:
            self.abort()

    def abort(self) -> None:
        if self._in_exchange:
            # Whoever waits for this exchange's head or body (`UpstreamClient.close()` aborts
            # busy connections too) must get an error: connection_lost will not settle it.
            self._fail(ResponseError("the connection to the upstream was closed by the proxy"))
        self._in_exchange = False
        self._cancel_timer()
        if self._release_when_written is not None:
            self._release_when_written.cancel()
            self._release_when_written = None
        self.closed = True
        self._pool.forget(self)
        if self._transport is not None:
            self._transport.abort()

    def _message_complete(self) -> None:
        self._complete = True
        self._wake_reader()

    def _wake_reader(self) -> None:
        waiter = self._chunk_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is not None or self._complete:
            return
        self._error = error
        self._cancel_timer()
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        chunk_waiter = self._chunk_waiter
        if chunk_waiter is not None and not chunk_waiter.done():
            chunk_waiter.set_exception(error)

    def _fail_and_close(self, error: UpstreamError) -> None:
        self._fail(error)
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    # -- the read timeout: one timer per connection, re-armed lazily -------------------------
    # A finished exchange leaves its timer running: the next exchange on the connection keeps
    # it (it fires no later than that exchange's own deadline, and `_check_silence` re-arms
    # from the last data), so a kept-alive connection makes a timer only once per timeout,
    # not per request (each `call_at` cost ~3,000 instructions under callgrind).
    def _ensure_timer(self) -> None:
        if self._timer is None:
            self._arm_timer()

    def _arm_timer(self) -> None:
        self._timer = self._loop.call_at(self._last_data + self._read_timeout, self._check_silence)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_silence(self) -> None:
        self._timer = None
        if not self._in_exchange or self._complete or self._error is not None:
            return
        now = self._loop.time()
        if self._paused:  # the client is slow and reading is paused: not the upstream's silence
            self._last_data = now
        elif self._write_paused and self._transport is not None:
            # The request is still going out: the wait for the answer has not begun, and only
            # an upstream that takes no byte of it for `read_timeout` is silent. Checked a few
            # times per timeout, and only while a large request is being written.
            unsent = self._transport.get_write_buffer_size()
            if unsent < self._unsent:
                self._unsent = unsent
                self._last_data = now
            elif now - self._last_data >= self._read_timeout:
                self._fail_and_close(
                    ReadTimeoutError(
                        f"the upstream took no byte of the request for {self._read_timeout:g} s"
                    )
                )
                return
            self._timer = self._loop.call_at(now + self._read_timeout / 4, self._check_silence)
            return
        elif now - self._last_data >= self._read_timeout:
            self._fail_and_close(
                ReadTimeoutError(f"the upstream sent nothing for {self._read_timeout:g} s")
            )
            return
        self._arm_timer()


def _response_framing(
    status: int, headers: list[tuple[bytes, bytes]], names: list[bytes]
) -> tuple[bool, float | None]:
    """Whether the body ends at the connection's close (RFC 9112 §6.3), and the Keep-Alive hint.

    `names` are the headers' names lowercased, in order.

    Raises ResponseError for transfer codings the client cannot pass on honestly (see
    `_ends_at_eof_by_codings`).
    """
    # Membership first (a C loop each): most answers have a length and nothing else here.
    has_length = b"content-length" in names
    codings: bytes | None = None
    keepalive_hint: float | None = None
    if b"transfer-encoding" in names or b"keep-alive" in names:
        for lowered, (_, value) in zip(names, headers, strict=True):
            if lowered == b"transfer-encoding":
                # Several fields make one list (RFC 9110 §5.3).
                codings = value if codings is None else codings + b"," + value
            elif lowered == b"keep-alive":
                keepalive_hint = _keepalive_timeout(value)  # the last one counts
    if status in (204, 304):
        return False, keepalive_hint  # no body, so no coded bytes to pass on as plain
    if codings is not None:
        # Transfer-Encoding overrides Content-Length (llhttp refuses both together).
        if codings == b"chunked":  # nearly every response with codings: nothing to parse
            return False, keepalive_hint
        return _ends_at_eof_by_codings(codings), keepalive_hint
    return not has_length, keepalive_hint


def _ends_at_eof_by_codings(codings: bytes) -> bool:
    """Whether a body with these transfer codings ends at the close; ResponseError if refused.

    The client decodes only chunked, and the forwarder drops Transfer-Encoding (hop-by-hop), so
    any other coding would reach the client as if the bytes were plain (RFC 9112 §6.3 allows
    the coding; passing it on dishonestly is what is refused). `identity` (RFC 2616 §3.6, since
    unregistered) is taken as no coding. Refused too: chunked twice (RFC 9112 §6.1) or not last,
    and lists llhttp reads otherwise than this function would (so that it would frame the body
    otherwise than the client relays it): empty elements, a tab as whitespace.
    """
    tokens = [token.strip(b" ") for token in codings.lower().split(b",")]
    named = [token for token in tokens if token != b"identity"]
    if (
        b"\t" in codings
        or any(token != b"chunked" for token in named)  # an empty one included
        or len(named) > 1
        or (named and tokens[-1] != b"chunked")
    ):
        raise ResponseError(
            f"the upstream sent Transfer-Encoding {codings!r}, which the proxy does not decode"
        )
    return not named


def _keepalive_timeout(value: bytes) -> float | None:
    """The `timeout=N` of a `Keep-Alive` header (RFC 2068 §19.7.1.1), in seconds, or None."""
    for parameter in value.split(b","):
        name, _, number = parameter.partition(b"=")
        if name.strip().lower() == b"timeout":
            number = number.strip()
            return float(number) if number.isdigit() else None
    return None


def reuse_window(keepalive: float, hint: float | None) -> float:
    """How long an idle connection may be reused: the keep-alive, or less if the upstream says.

    The upstream's clock starts when it sent its last byte, ours when we read it, and its timer
    fires in whole seconds: keep a second of margin (half the hint for hints under two seconds).
    A longer hint does not lengthen the keep-alive: it is there for upstreams that give none,
    and for the intermediaries between that close idle connections sooner than the origin says.
    """
    if hint is None:
        return keepalive
    return min(keepalive, max(hint - 1.0, hint / 2))


class _Pool:
    """Idle connections per origin, most recently used first; a bound on all connections."""

    def __init__(self, keepalive: float, max_connections: int) -> None:
        self._keepalive = keepalive
        self._max_connections = max_connections
        self._idle: dict[Origin, collections.deque[_Connection]] = {}
        self._origins: dict[_Connection, Origin] = {}
        self.open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None

    def take_idle(self, origin: Origin, now: float) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            # `closed` is set when the upstream's FIN is read; a transport can also be closing
            # for other reasons (a failed write) a loop turn before `connection_lost`.
            transport = connection._transport
            if now < connection.idle_until and transport is not None and not transport.is_closing():
                return connection
            connection.abort()
        return None

    async def reserve(self, origin: Origin, take_idle: bool = True) -> _Connection | None:
        """Room for one more connection (None), or an idle one to `origin` freed meanwhile.

        With `take_idle=False` the caller wants a new connection: idle ones are closed for room.
        """
        while self.open >= self._max_connections:
            # Idle connections count against the bound: close one (to any origin) to make
            # room rather than wait for it to expire.
            if self._evict_idle():
                continue
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled before running: pass the turn on
                raise
            # Woken by a release: the connection that came back may be one to this origin.
            connection = self.take_idle(origin, time.monotonic()) if take_idle else None
            if connection is not None:
                return connection
        self.open += 1
        return None

    def opened(self, connection: _Connection, origin: Origin) -> None:
        self._origins[connection] = origin

    def unreserve(self) -> None:
        self.open -= 1
        self._wake_one()

    def release(self, connection: _Connection) -> None:
        origin = self._origins.get(connection)
        if origin is None:
            connection.abort()
            return
        now = time.monotonic()
        connection.idle_since = now
        hint = connection.keepalive_hint
        connection.idle_until = now + (
            self._keepalive if hint is None else reuse_window(self._keepalive, hint)
        )
        self._idle.setdefault(origin, collections.deque()).append(connection)
        if self._sweeper is None:  # the loop is looked up only then: it costs a system call
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive, self._sweep)
        self._wake_one()  # a request waiting for room can take this one, or close it for room

    def _evict_idle(self) -> bool:
        """Close the connection idle for longest, whatever its origin; False if none is idle."""
        oldest: collections.deque[_Connection] | None = None
        for idle in self._idle.values():
            while idle and idle[0].closed:
                idle.popleft()
            if idle and (oldest is None or idle[0].idle_since < oldest[0].idle_since):
                oldest = idle
        if oldest is None:
            return False
        oldest.popleft().abort()
        return True

    def forget(self, connection: _Connection) -> None:
        if self._origins.pop(connection, None) is not None:
            self.open -= 1
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        """Close connections idle for longer than the keep-alive (one timer for the pool)."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        remaining = False
        for idle in self._idle.values():
            # Expiry follows idleness only for equal windows (a Keep-Alive hint shortens one):
            # look at each, keeping the order (most recently used last).
            for _ in range(len(idle)):
                connection = idle.popleft()
                if connection.closed or now >= connection.idle_until:
                    connection.abort()
                else:
                    idle.append(connection)
            remaining = remaining or bool(idle)
        if remaining:
            self._sweeper = loop.call_later(self._keepalive / 2, self._sweep)

    def idle_count(self) -> int:
        return sum(1 for idle in list(self._idle.values()) for c in list(idle) if not c.closed)

    def close_all(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().abort()
        for connection in list(self._origins):
            connection.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class UpstreamClient:
    """Sends requests to upstream origins over pooled keep-alive connections."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        keepalive: float = KEEPALIVE_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._pool = _Pool(keepalive, max_connections)
        self.ssl_context = ssl_context
        self._closed = False

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | StreamedBody,
    ) -> UpstreamResponse:
        """Send one request and return once the response's head has arrived.

        `target` is the request target as it goes on the wire (path and query, still
        percent-encoded); `headers` must not hold `Host`, `Content-Length` or hop-by-hop names.
        Both are byte strings held as latin-1 text: each character is written as one byte.
        """
        if self._closed:
            raise ConnectFailedError("the upstream client is closed")
        via = origin.via
        if via is not None and origin.scheme == "http":
            # Through a forward proxy: the absolute form (RFC 9112 §3.2.2) and its credentials.
            target = f"http://{origin.host_header}{target}"
            lines = [f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
            if via.authorization is not None:
                lines.append(f"Proxy-Authorization: {via.authorization}\r\n")
        else:
            lines = [f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers)
        if isinstance(body, StreamedBody):
            lines.append(
                "Transfer-Encoding: chunked\r\n"
                if body.length is None
                else f"Content-Length: {body.length}\r\n"
            )
        elif body or method not in _NO_BODY_METHODS:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        # Exactly one line break per line written: the request line, Host, each header, the end.
        if text.count("\n") != len(lines) + 1 or text.count("\r") != len(lines) + 1:
            raise UnsendableRequestError("a request header or the target holds a line break")
        try:
            # One byte per character: the forwarder hands over header values decoded as
            # latin-1 (the client's bytes) and configured values as their UTF-8 bytes.
            head = text.encode("latin-1")
        except UnicodeEncodeError:
            raise UnsendableRequestError(
                "a request header holds a character above U+00FF"
            ) from None
        if isinstance(body, StreamedBody):
            # A new connection: a reused one may be closing, and this body cannot be sent
            # twice; one connect per large upload costs nothing next to the upload.
            fresh = await self._connect(origin, fresh=True)
            return await fresh.send_streamed(head, body)
        connection = self._pool.take_idle(origin, time.monotonic())
        if connection is None:
            connection = await self._connect(origin)
        try:
            return await connection.send(head, body, method == "HEAD")
        except ConnectionClosedError as error:
            # Go's Transport rule (transport.go, shouldRetryRequest): the upstream closed a
            # reused connection, perhaps as idle, before any byte of an answer; send again
            # once if it cannot have acted on the request or may act on it twice.
            if not error.reused or not (error.nothing_written or _replayable(method, headers)):
                raise
        try:
            connection = await self._connect(origin, fresh=True)
            response = await connection.send(head, body, method == "HEAD")
        except UpstreamError as error:
            error.stale_retries = 1
            raise
        response.stale_retries = 1
        return response

    async def _connect(self, origin: Origin, fresh: bool = False) -> _Connection:
        idle = await self._pool.reserve(origin, take_idle=not fresh)
        if idle is not None:
            return idle  # came back to the pool while this request waited for room
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                if origin.via is not None:
                    transport, connection = await self._connect_via(origin, origin.via, loop)
                elif origin.scheme == "https":
                    context = self.ssl_context or default_ssl_context()
                    transport, connection = await loop.create_connection(
                        lambda: _Connection(self._pool, self._read_timeout),
                        origin.host,
                        origin.port,
                        ssl=context,
                        server_hostname=origin.host,
                    )
                else:
                    transport, connection = await loop.create_connection(
                        lambda: _Connection(self._pool, self._read_timeout),
                        origin.host,
                        origin.port,
                    )
        except TimeoutError as error:
            self._pool.unreserve()
            if origin.via is not None:
                raise EgressProxyError(
                    f"no tunnel from the egress proxy {origin.via.shown} to "
                    f"{origin.host_header} within {self._connect_timeout:g} s"
                ) from error
            raise ConnectTimeoutError(
                f"no connection to {origin.host_header} within {self._connect_timeout:g} s"
            ) from error
        except EgressProxyError:
            self._pool.unreserve()
            raise
        except OSError as error:  # refused, unreachable, DNS failure, TLS failure
            self._pool.unreserve()
            raise ConnectFailedError(f"cannot connect to {origin.host_header}: {error}") from error
        except BaseException:
            self._pool.unreserve()
            raise
        # uvloop may call `connection_made` only after create_connection has returned.
        connection.connection_made(transport)
        self._pool.opened(connection, origin)
        if self._closed or connection.closed:
            # The client was closed while this connection was being made, or the upstream
            # closed it at once: nobody would ever release or notice it.
            connection.abort()
            raise ConnectFailedError(f"the connection to {origin.host_header} closed at once")
        return connection

    async def _connect_via(
        self, origin: Origin, via: EgressProxy, loop: asyncio.AbstractEventLoop
    ) -> tuple[asyncio.BaseTransport, _Connection]:
        """A connection through the egress proxy: to the proxy itself for an `http://` upstream
        (requests then go in absolute form), or a `CONNECT` tunnel and TLS through it to an
        `https://` one, verified against the upstream's name."""
        try:
            if origin.scheme == "http":
                return await loop.create_connection(
                    lambda: _Connection(self._pool, self._read_timeout), via.host, via.port
                )
            transport, opener = await loop.create_connection(_TunnelOpener, via.host, via.port)
        except OSError as error:
            raise EgressProxyError(
                f"cannot connect to the egress proxy {via.shown}: {error.strerror or error}"
            ) from None
        try:
            host = f"[{origin.host}]" if ":" in origin.host else origin.host
            authority = f"{host}:{origin.port}"  # CONNECT's target names the port always
            request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
            if via.authorization is not None:
                request += f"Proxy-Authorization: {via.authorization}\r\n"
            transport.write((request + "\r\n").encode("latin-1"))
            status = await opener.reply
            if status != 200:
                raise EgressProxyError(
                    f"the egress proxy {via.shown} answered CONNECT {authority} with {status}"
                )
            connection = _Connection(self._pool, self._read_timeout)
            context = self.ssl_context or default_ssl_context()
            try:
                tls = await loop.start_tls(
                    transport, connection, context, server_hostname=origin.host
                )
            except (OSError, ssl.SSLError) as error:
                raise ConnectFailedError(
                    f"cannot connect to {origin.host_header} through {via.shown}: {error}"
                ) from None
            assert tls is not None
            return tls, connection
        except BaseException:
            transport.abort()
            raise

    def pool_counts(self) -> tuple[int, int]:
        """(connections carrying an exchange or connecting, idle connections kept alive)."""
        idle = self._pool.idle_count()
        return self._pool.open - idle, idle

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        self._closed = True
        self._pool.close_all()


class _TunnelOpener(asyncio.Protocol):
    """Reads the egress proxy's answer to `CONNECT`: its status, once the head is complete."""

    def __init__(self) -> None:
        self.reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._head = b""

    def data_received(self, data: bytes) -> None:
        if self.reply.done():
            return
        self._head += data
        if b"\r\n\r\n" in self._head or len(self._head) > MAX_HEAD_BYTES:
            status_line = self._head.split(b"\r\n", 1)[0].split()
            try:
                status = int(status_line[1]) if status_line[0].startswith(b"HTTP/") else 0
            except (IndexError, ValueError):
                status = 0
            self.reply.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reply.done():
            self.reply.set_result(0)  # closed before answering: a refusal all the same


_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})


def _replayable(method: str, headers: list[tuple[str, str]]) -> bool:
    """Whether a request may be sent twice: an idempotent method, or an idempotency key."""
    return method in _IDEMPOTENT_METHODS or any(
        name.lower() in _IDEMPOTENCY_KEYS for name, _ in headers
    )


_ssl_context: ssl.SSLContext | None = None


def default_ssl_context() -> ssl.SSLContext:
    """The system's trust store and default TLS settings, made once."""
    global _ssl_context  # built on first use: start-up stays fast without TLS upstreams
    if _ssl_context is None:
        _ssl_context = ssl.create_default_context()
    return _ssl_context
