"""Test helpers: real servers on free loopback ports, started and stopped on events (no sleeps)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import httpx
import uvicorn
from aiohttp import web
from starlette.types import ASGIApp

from llmproxy.app import ProxyApp
from llmproxy.testing import proxy_app
from llmproxy.upstream_client import Origin, UpstreamClient, UpstreamResponse

__all__ = ["proxy_app"]

STARTUP_DEADLINE = 10.0


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def serve_asgi(app: ASGIApp, **options: Any) -> AsyncIterator[str]:
    """Run `app` under a real uvicorn server in this event loop; yield its base URL."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=free_port(),
        log_level="warning",
        lifespan="on",
        loop="none",
        http="httptools",
        server_header=False,
        date_header=False,
        **options,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(STARTUP_DEADLINE):
            while not server.started:
                if task.done():
                    task.result()  # raises the start-up failure
                    raise RuntimeError("uvicorn stopped before it started")
                await asyncio.sleep(0.01)  # polling a flag with a deadline, not waiting for luck
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=STARTUP_DEADLINE)


@contextlib.asynccontextmanager
async def lifespan(app: ProxyApp) -> AsyncIterator[ProxyApp]:
    """Run the app's start-up and shutdown around an in-process test."""
    async with app.router.lifespan_context(app):
        yield app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ThrowawayUpstream:
    """An aiohttp server on a free loopback port whose one handler each test sets."""

    def __init__(self) -> None:
        self.handler: Handler = self._not_set
        self.requests: list[web.Request] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _not_set(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=599, text="no handler set")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        return await self.handler(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def raw_tcp_upstream(
    on_connection: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A TCP server that speaks whatever bytes `on_connection` writes (hostile upstreams)."""
    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), timeout=2)


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    """Consume one request's head (and a Content-Length body) from a raw connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":", 1)[1]))
    return head


def llmproxy_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any LLMPROXY_*/metrics settings, plus `settings`."""
    inherited = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LLMPROXY_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    return inherited | settings


def wait_until_ready(url: str, process: subprocess.Popen[bytes], deadline: float = 30.0) -> None:
    """Poll `url`/readyz until it answers 200; fail if the process exits or time runs out."""
    give_up = time.monotonic() + deadline
    while True:
        assert process.poll() is None, "llmproxy serve exited while starting"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        assert time.monotonic() < give_up, "llmproxy serve did not become ready"
        time.sleep(0.05)  # polling readiness with a deadline


@contextlib.contextmanager
def serve_subprocess(
    env: dict[str, str], *args: str, output: int | None = subprocess.DEVNULL
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m llmproxy serve --port P *args` as a child process, ready; killed at the end."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llmproxy", "serve", "--port", str(port), *args],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT if output == subprocess.PIPE else output,
        start_new_session=True,  # its own process group, so its workers can be stopped with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()  # graceful: with --workers, uvicorn stops its workers too
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        # Whatever is left in its session (a worker of a killed supervisor) goes as well.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)


# -- scripted raw upstreams, for the upstream client's own tests -----------------------------------

DEADLINE = 5.0

# Longer than DEADLINE, so that a client that hangs fails a test's deadline instead of ending in
# a ReadTimeoutError, and an idle connection is not closed by the pool's sweep, unless a test
# sets these itself: neither may pass for the behaviour under test.
PATIENT_READ_TIMEOUT = 4 * DEADLINE
PATIENT_KEEPALIVE = 12 * DEADLINE

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ClientFactory = Callable[..., UpstreamClient]


class Upstream:
    """What the scripted upstream saw: connections accepted and connections ended."""

    def __init__(self) -> None:
        self.accepted = 0
        self.ended = 0


@contextlib.asynccontextmanager
async def scripted(handler: RawHandler) -> AsyncIterator[tuple[Origin, Upstream]]:
    """A raw TCP upstream running `handler` on each connection, and what it saw.

    On exit it closes the connections still open and waits for their handlers, so that none is
    left pending when the test's event loop closes.
    """
    upstream = Upstream()
    handlers: set[asyncio.Task[Any]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        writers.append(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: several tests make it do exactly that
        finally:
            upstream.ended += 1
            writer.close()

    async with raw_tcp_upstream(on_connection) as url:
        try:
            yield Origin.from_url(url), upstream
        finally:
            for writer in writers:
                writer.transport.abort()  # a handler waiting for the client's EOF gets one now
            if handlers:
                _, pending = await asyncio.wait(handlers, timeout=DEADLINE)
                for task in pending:  # a handler stuck on the test's own events
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)


async def until_eof(reader: asyncio.StreamReader) -> None:
    """Wait for the client to close the connection (a reset counts as a close)."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


def answer_each(response: bytes) -> RawHandler:
    """An upstream answering every request on a connection with `response`, until EOF."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            writer.write(response)
            await writer.drain()

    return handler


async def eventually(condition: Callable[[], object], deadline: float = DEADLINE) -> None:
    """Poll `condition` until it holds; fail if it does not within `deadline` seconds."""
    async with asyncio.timeout(deadline):
        while not condition():  # noqa: ASYNC110 - polls state that no event signals
            await asyncio.sleep(0.005)


async def fetch(
    client: UpstreamClient,
    origin: Origin,
    method: str = "GET",
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> UpstreamResponse:
    async with asyncio.timeout(DEADLINE):
        return await client.request(origin, method, target, list(headers), body)


async def read_body(response: UpstreamResponse, into: list[bytes] | None = None) -> bytes:
    """The rest of the body; `into` collects the chunks even if reading ends in an error."""
    chunks = [] if into is None else into
    async with asyncio.timeout(DEADLINE):
        async for chunk in response:
            chunks.append(chunk)
    return b"".join(chunks)


async def fetch_whole(client: UpstreamClient, origin: Origin) -> bytes:
    """GET / and its whole body; the response is closed, so a kept connection goes back idle."""
    response = await fetch(client, origin)
    try:
        return await read_body(response)
    finally:
        response.close()


def internals(response: UpstreamResponse) -> Any:
    """The connection under a response: back-pressure is only visible there."""
    return response._connection
