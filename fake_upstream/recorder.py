"""The recording pass-through: forward a `/v1` request to the real upstream, relay its response
chunk by chunk as the chunks arrive, and write the exchange as a cassette.

The recorder is an HTTP client of the upstream (httpx, already a dependency). `aiter_raw()`
yields each piece of the body as the connection delivers it, still content-encoded, so the
cassette holds the chunks and their arrival times rather than a re-chunked copy.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fake_upstream import wire
from fake_upstream.cassettes import NOT_REPLAYED, Cassette, Chunk, now_iso, write_cassette
from fake_upstream.journal import Journal, JournalEntry
from fake_upstream.plan import Write
from fake_upstream.responses import ScriptedResponse, transport_of

_log = logging.getLogger("fake_upstream.recorder")

# Request headers the recorder does not forward: connection-specific ones (RFC 9110 §7.6.1),
# `host` and `content-length`, which httpx derives from the URL and the body, and the
# credentials meant for this hop only.
NOT_FORWARDED: Final = NOT_REPLAYED | {"host", "content-length", "proxy-authorization"}
UPSTREAM_TIMEOUT: Final = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=10.0)


def check_upstream_url(url: str) -> str:
    """The upstream's origin (and optional path prefix), without a trailing slash; raise
    ValueError with a one-line reason for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid upstream URL {url!r}: expected http(s)://host[:port]")
    if parts.query or parts.fragment:
        raise ValueError(f"invalid upstream URL {url!r}: no query or fragment allowed")
    return url.rstrip("/")


@dataclass(frozen=True, slots=True)
class Forwarded:
    """The outbound request, built from the inbound one in one step (never mutating it)."""

    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes


def outbound_request(
    upstream: str,
    method: str,
    raw_path: str,
    query: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
) -> Forwarded:
    url = upstream + raw_path + (f"?{query}" if query else "")
    kept = [(name, value) for name, value in headers if name.lower() not in NOT_FORWARDED]
    return Forwarded(method, url, kept, body)


async def record_exchange(
    *,
    directory: Path,
    upstream: str,
    method: str,
    path: str,
    raw_path: str,
    query: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    journal: Journal,
    entry: JournalEntry,
) -> Response:
    """Send the request upstream and return the response that relays and records the answer;
    a 502 (`code: upstream_unreachable`) when the upstream cannot be reached."""
    out = outbound_request(upstream, method, raw_path, query, headers, body)
    # One client per exchange: recording is not a hot path, and a client bound to no event
    # loop or thread in particular needs no closing from elsewhere.
    client = httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT, follow_redirects=False)
    started = time.monotonic()
    try:
        request = httpx.Request(out.method, out.url, headers=out.headers, content=out.body)
        upstream_response = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        await client.aclose()
        message = f"fake-upstream record: cannot reach the upstream {upstream}: {exc!r}"
        data = wire.pretty_json(wire.request_error(message, code="upstream_unreachable"))
        return ScriptedResponse(
            status=502,
            headers=[("content-type", "application/json"), ("content-length", str(len(data)))],
            steps=[Write(data)],
            delay=0.0,
            journal=journal,
            entry=entry,
        )
    headers_ms = (time.monotonic() - started) * 1000
    response_headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in upstream_response.headers.raw
    ]
    draft = Cassette(
        method=method,
        path=path,
        query=query,
        request_headers=tuple(headers),
        request_body=body,
        status=upstream_response.status_code,
        response_headers=tuple(response_headers),
        headers_ms=round(headers_ms, 3),
        chunks=(),
        recorded_at=now_iso(),
        upstream=upstream,
    )
    return PassThroughResponse(
        client=client,
        upstream=upstream_response,
        draft=draft,
        started=started,
        directory=directory,
        journal=journal,
        entry=entry,
    )


class PassThroughResponse(Response):
    """Relay the upstream's response as it arrives; write the cassette once the body is all
    there and before the client can see it complete, so a test that got its response can read
    the file. A client leaving or an upstream failing mid-body writes nothing."""

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        upstream: httpx.Response,
        draft: Cassette,
        started: float,
        directory: Path,
        journal: Journal,
        entry: JournalEntry,
    ) -> None:
        self.status_code = upstream.status_code
        self.raw_headers = [
            (name.lower(), value)
            for name, value in upstream.headers.raw
            if name.decode("latin-1").lower() not in NOT_REPLAYED
        ]
        self.background = None
        self._client = client
        self._upstream = upstream
        self._draft = draft
        self._started = started
        self._directory = directory
        self._journal = journal
        self._entry = entry
        length = upstream.headers.get("content-length")
        self._content_length = int(length) if length is not None and length.isdigit() else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as task_group:

                async def watch_for_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if not self._entry.completed:
                        self._journal.record_disconnected(self._entry)
                        task_group.cancel_scope.cancel()

                task_group.start_soon(watch_for_disconnect)
                await self._relay(scope, send)
                task_group.cancel_scope.cancel()
        finally:
            await self._upstream.aclose()
            await self._client.aclose()

    async def _relay(self, scope: Scope, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        self._journal.record_headers_sent(self._entry, self.status_code)
        chunks: list[Chunk] = []
        received = 0
        written = False
        try:
            async for data in self._upstream.aiter_raw():
                ms = round((time.monotonic() - self._started) * 1000, 3)
                chunks.append(Chunk(ms, data))
                received += len(data)
                if self._content_length is not None and received >= self._content_length:
                    self._save(chunks)
                    written = True
                await send({"type": "http.response.body", "body": data, "more_body": True})
                self._journal.record_chunk(self._entry, len(data))
        except httpx.HTTPError as exc:
            _log.warning(
                "fake-upstream record: %s %s: the upstream failed mid-body (%r); not recorded",
                self._draft.method,
                self._draft.path,
                exc,
            )
            transport = transport_of(scope)
            if transport is None:
                raise
            transport.abort()
            return
        if not written:
            self._save(chunks)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self._journal.record_completed(self._entry)

    def _save(self, chunks: list[Chunk]) -> None:
        path = write_cassette(
            self._directory, dataclasses.replace(self._draft, chunks=tuple(chunks))
        )
        self._journal.record_cassette(self._entry, path.name)
