"""The reference: a minimal pass-through proxy, raw ASGI + one aiohttp session, on uvicorn.

  BENCH_UPSTREAM_URL=http://127.0.0.1:P/v1 uvicorn --app-dir bench reference_proxy:app ...

It does what any proxy must (hop-by-hop headers stripped both ways, raw path and query, no
added request headers, bytes passed through as they arrive) and nothing else: no retries,
access keys, limits, request ids or logging. llmproxy is reported relative to it, in the same
run, because absolute numbers move with the machine and whatever else runs on it.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp
from yarl import URL

UPSTREAM = os.environ.get("BENCH_UPSTREAM_URL", "http://127.0.0.1:18080/v1").rstrip("/")
# RFC 9110 §7.6.1 hop-by-hop, plus host/content-length (the client library sets them).
HOP = frozenset(
    b"connection keep-alive proxy-connection proxy-authorization proxy-authenticate "
    b"te trailer transfer-encoding upgrade host content-length".split()
)
RESPONSE_HOP = HOP - {b"content-length"}  # bytes pass through raw, so the length stays true
NOT_FOUND = b'{"error":{"message":"not found","type":"invalid_request_error","code":"not_found"}}'

Headers = list[tuple[bytes, bytes]]


def strip_hop(headers: Headers, hop: frozenset[bytes] = HOP) -> Headers:
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    return [(k, v) for k, v in headers if (lk := k.lower()) not in hop and lk not in named]


class Forwarder:
    """Forwards /v1/<rest>?<query> to UPSTREAM/<rest>?<query> and streams the answer back."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None

    async def startup(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=4096, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            # aiohttp would otherwise add Accept, Accept-Encoding, User-Agent and a Content-Type
            # the client never sent.
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            trust_env=False,
        )

    async def shutdown(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert self.session is not None
        parts, more = [], True
        while more:
            message = await receive()
            parts.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(parts)
        url = UPSTREAM + scope["path"][3:]
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in strip_hop(scope["headers"])
        ]
        async with self.session.request(
            scope["method"],
            URL(url, encoded=True),  # encoded: yarl would otherwise re-quote the query
            data=body or None,
            headers=headers,
            allow_redirects=False,
        ) as response:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": strip_hop(list(response.raw_headers), RESPONSE_HOP),
                }
            )
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


forwarder = Forwarder()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await forwarder.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await forwarder.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http" and scope["path"].startswith("/v1/"):
        await forwarder(scope, receive, send)
    else:
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 404, "headers": headers})
        await send({"type": "http.response.body", "body": NOT_FOUND})
