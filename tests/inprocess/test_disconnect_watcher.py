"""Client disconnects under an ASGI server other than llmproxy's own protocol.

`llmproxy serve` tells the forwarder of a disconnect from its server protocol
(`llmproxy.protocol.DisconnectSignal`); under any other server the forwarder falls back to a task
waiting in `receive()`. This runs the app under plain uvicorn to keep that fallback honest.
"""

from __future__ import annotations

import asyncio

from llmproxy.config import Configuration
from tests.support import proxy_app, raw_tcp_upstream, read_request_head, serve_asgi

DEADLINE = 5.0


async def test_client_leaving_mid_stream_closes_the_upstream_request_under_plain_uvicorn() -> None:
    upstream_closed = asyncio.Event()
    first_chunk_sent = asyncio.Event()

    async def slow_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        event = b'data: {"n":1}\n\n'
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        first_chunk_sent.set()
        # Never finishes on its own: only the proxy closing the connection ends this read.
        await reader.read()
        upstream_closed.set()
        writer.close()

    async with raw_tcp_upstream(slow_stream) as upstream_url:
        app = proxy_app(Configuration(upstream_urls=(f"{upstream_url}/v1",)))
        async with serve_asgi(app) as proxy_url:
            host, port = proxy_url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\n"
                b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
            )
            await writer.drain()
            async with asyncio.timeout(DEADLINE):
                await first_chunk_sent.wait()
                assert b"data: " in await reader.readuntil(b"\n\n")
            writer.close()  # the client leaves mid-stream
            async with asyncio.timeout(DEADLINE):
                await upstream_closed.wait()
