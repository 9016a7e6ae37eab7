"""A cheap upstream in Python: asyncio protocol + httptools, fixed answers, no framework.

  python py_upstream.py --port P

Serves POST `PLAIN_PATH` (the ~1 KB completion) and `STREAM_PATH` (the 50-event stream), both
with Content-Length like nginx does, and `SLOW_PATH`: 20 SSE events 100 ms apart, chunked, for
the slow-streams test (nginx cannot pace events). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

import httptools

from loadgen import run_fast
from payloads import (
    COMPLETION,
    PLAIN_PATH,
    SLOW_INTERVAL_S,
    SLOW_PATH,
    SLOW_STREAM_EVENTS,
    STREAM,
    STREAM_PATH,
)


def _response(content_type: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"x-request-id: req_bench\r\n\r\n" + body
    )


FIXED = {
    PLAIN_PATH.encode(): _response(b"application/json", COMPLETION),
    STREAM_PATH.encode(): _response(b"text/event-stream", STREAM),
}
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
SLOW_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"x-request-id: req_bench\r\ntransfer-encoding: chunked\r\n\r\n"
)
SLOW_CHUNKS = [b"%x\r\n%s\r\n" % (len(event), event) for event in SLOW_STREAM_EVENTS]


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive, requests answered in order."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        path, self.url = self.url.split(b"?", 1)[0], b""
        transport = self.transport
        if transport is None:
            return
        if path == SLOW_PATH.encode():
            transport.write(SLOW_HEAD + SLOW_CHUNKS[0])
            asyncio.get_running_loop().call_later(SLOW_INTERVAL_S, self._slow, 1)
            return
        transport.write(FIXED.get(path, NOT_FOUND))
        if not self.parser.should_keep_alive():
            transport.close()

    def _slow(self, index: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(SLOW_CHUNKS[index])
        if index + 1 < len(SLOW_CHUNKS):
            asyncio.get_running_loop().call_later(SLOW_INTERVAL_S, self._slow, index + 1)
        else:
            transport.write(b"0\r\n\r\n")


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    run_fast(serve(args.port))


if __name__ == "__main__":
    main()
