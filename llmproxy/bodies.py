"""Request bodies (DESIGN §12): held whole when small, streamed to the upstream when large.

A body up to `request_buffer_bytes` is read whole, as it always was, so retries and failover
can send it again. A larger one — declared by `Content-Length`, or found while reading a
chunked upload — becomes a `StreamedBody`: the upstream client writes its parts as they
arrive, and reads the next only when the upstream has taken the last (uvicorn then holds the
client back), so memory no longer grows with the body. Once its first byte has gone it cannot
be sent again: such a request is not retried.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.types import Receive


class BodyTooLargeError(Exception):
    """The request body is over `max_body_bytes` (found while reading it)."""


class ClientGoneError(Exception):
    """The client disconnected (or timed out) before its body was complete."""


class StreamedBody:
    """A request body too large to hold: the parts read so far, then the rest as it comes."""

    __slots__ = ("_complete", "_limit", "_parts", "_receive", "_size", "length", "started")

    def __init__(
        self,
        parts: list[bytes],
        receive: Receive,
        limit: int,
        length: int | None,
        complete: bool = False,
    ) -> None:
        # `complete`: every part is here already (a chunked body whose last part crossed the
        # buffer): sent as one, and like any streamed body, not retried, so the rule has no
        # exception (bodies over request_buffer_bytes are never sent twice).
        self._complete = complete
        self._parts = parts
        self._receive = receive
        self._limit = limit
        self._size = sum(len(part) for part in parts)
        self.length = length  # the declared Content-Length; None: sent chunked
        self.started = False  # a byte has been handed out: it cannot be sent again

    @property
    def size(self) -> int:
        """Bytes read from the client so far."""
        return self._size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        parts, self._parts = self._parts, []
        for held in parts:
            yield held
        while not self._complete:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGoneError
            part: bytes = message.get("body", b"")
            self._size += len(part)
            if self._size > self._limit:
                raise BodyTooLargeError
            if part:
                yield part
            if not message.get("more_body", False):
                return


async def read_body(
    receive: Receive, limit: int, buffer_bytes: int, declared: int | None
) -> bytes | StreamedBody | None:
    """The whole body if it fits `buffer_bytes`, else a `StreamedBody` of it; None if the
    client disconnected first. Raises BodyTooLargeError over `limit` (chunked bodies too,
    whose size nobody declared)."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise BodyTooLargeError
        return body
    parts = [body]
    size = len(body)
    if declared is not None and declared > buffer_bytes:
        return StreamedBody(parts, receive, limit, declared)
    while True:
        if size > limit:
            raise BodyTooLargeError
        if size > buffer_bytes:
            return StreamedBody(parts, receive, limit, declared)
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        part = message.get("body", b"")
        parts.append(part)
        size += len(part)
        if not message.get("more_body", False):
            if size > limit:
                raise BodyTooLargeError
            if size > buffer_bytes:  # whole already, but over the buffer: streamed all the same
                return StreamedBody(parts, receive, limit, declared, complete=True)
            return b"".join(parts)
