"""Serving the fake upstream with uvicorn: in a background thread for tests
(`FakeUpstreamServer`), or in the foreground for the CLI (`serve_forever`).

Both use `TransportExposingProtocol`, which is what lets a script end a stream with a real
TCP reset; any other server runs every other script the same.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from fake_upstream.app import (
    create_app,
    fixtures_of,
    journal_of,
    script_queue_of,
    set_cassette_deck,
)
from fake_upstream.cassettes import Mode, Timing
from fake_upstream.fixtures import FixtureRule
from fake_upstream.journal import JournalSnapshot
from fake_upstream.playback import Recording, make_deck
from fake_upstream.responses import TRANSPORT_EXTENSION
from fake_upstream.scripts import parse_queue_request

if TYPE_CHECKING:
    from fastapi import FastAPI


class TransportExposingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the connection's transport in each request's scope
    (`scope["extensions"]["fake_upstream.transport"]["transport"]`), so a scripted `reset` can
    set SO_LINGER and abort the socket. ASGI gives apps no other way to send an RST."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {TRANSPORT_EXTENSION: {"transport": self.transport}}


class TransportExposingWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O `websockets` protocol, plus the same transport extension in each
    session's scope, so a scripted `reset` can abort a WebSocket too."""

    def handle_connect(self, event: Request) -> None:
        # The scope is built and the app's task created (not yet run) in here.
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][TRANSPORT_EXTENSION] = {"transport": self.transport}


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's graceful shutdown waits for open responses, and a stalled stream never
        # finishes; a fake has no work worth draining, so drop every connection at once.
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        await super().shutdown(sockets=sockets)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket bound before uvicorn starts, so port 0 resolves to a known port."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_config(app: FastAPI, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "http": TransportExposingProtocol,
        "ws": TransportExposingWebSocketProtocol,
        "lifespan": "off",
        "timeout_graceful_shutdown": 2,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def serve_forever(
    app: FastAPI, sock: socket.socket, on_started: Callable[[], None], log_level: str
) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (the CLI)."""
    _Server(make_config(app, log_level=log_level), on_started).run(sockets=[sock])


class FakeUpstreamServer:
    """The fake upstream as a real uvicorn server on a loopback port, in a daemon thread.

    Use as a context manager, or `start()` / `stop()`. The journal and queue methods act on the
    app in-process, so they need no HTTP round trip.
    """

    def __init__(
        self,
        app: FastAPI | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        startup_timeout: float = 10.0,
    ) -> None:
        self.app = app if app is not None else create_app(latency)
        self._host = host
        self._port = port
        self._startup_timeout = startup_timeout
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    # --- lifecycle ---

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("FakeUpstreamServer is already started")
        sock = bind_socket(self._host, self._port)
        ready = threading.Event()
        # log_config=None: leave the host process's logging (e.g. pytest's capture) alone.
        config = make_config(self.app, log_config=None, log_level="warning", access_log=False)
        server = _Server(config, on_started=ready.set)

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # reported by start(); a thread cannot raise to it
                self._failure = exc
            finally:
                ready.set()  # never leave start() waiting on a server that died

        thread = threading.Thread(target=run, name=f"fake-upstream {url_of(sock)}", daemon=True)
        self._sock, self._server, self._thread = sock, server, thread
        thread.start()
        if not ready.wait(self._startup_timeout) or not server.started:
            self.stop()
            raise RuntimeError(
                f"fake upstream did not start within {self._startup_timeout}s: {self._failure!r}"
            )
        return self

    def stop(self, timeout: float = 10.0) -> None:
        server, thread, sock = self._server, self._thread, self._sock
        self._server = self._thread = self._sock = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"fake upstream did not stop within {timeout}s")
        if sock is not None:
            sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- addresses ---

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT`, no trailing slash."""
        if self._sock is None:
            raise RuntimeError("FakeUpstreamServer is not started")
        return url_of(self._sock)

    @property
    def base_url(self) -> str:
        """The OpenAI base URL: `url + "/v1"`."""
        return f"{self.url}/v1"

    # --- journal and scripts, in-process ---

    def journal(self) -> JournalSnapshot:
        """Every `/v1` request so far, as `GET /_fake/journal` returns them."""
        return journal_of(self.app).entries()

    def wait_for_journal(
        self, predicate: Callable[[JournalSnapshot], bool], timeout: float = 5.0
    ) -> JournalSnapshot:
        """Wait until `predicate(journal)` holds; raise `JournalTimeoutError` (an AssertionError,
        with the journal in its message) after `timeout` seconds."""
        return journal_of(self.app).wait_for(predicate, timeout)

    def queue(self, *scripts: Mapping[str, Any] | str) -> None:
        """Queue scripts (objects, or scenario names) for the next requests, one each.
        Raises `ScriptError` (a ValueError) naming the first bad one; then none is queued."""
        script_queue_of(self.app).push(parse_queue_request({"scripts": list(scripts)}))

    def clear(self) -> None:
        """Empty the journal and the script queue."""
        journal_of(self.app).clear()
        script_queue_of(self.app).clear()

    def reset(self) -> None:
        """`clear()`, and drop loaded fixtures, strict mode and cassettes (what the `fake_upstream`
        pytest fixture does before each test)."""
        self.clear()
        fixtures_of(self.app).clear()
        set_cassette_deck(self.app, None)

    # --- fixtures and cassettes ---

    def load_fixtures(self, path: str | Path, *, strict: bool | None = None) -> list[FixtureRule]:
        """Add the rules of a fixture file or directory (as `--fixtures`) after those loaded;
        `strict=True` makes unmatched requests a 400 (`--strict`). Raises `FixtureError` (a
        ValueError) naming the file and the rule; then nothing is added."""
        fixtures = fixtures_of(self.app)
        rules = fixtures.load(path)
        if strict is not None:
            fixtures.strict = strict
        return rules

    def use_cassettes(
        self,
        directory: str | Path,
        mode: Mode = "replay",
        *,
        upstream: str | None = None,
        timing: Timing = "recorded",
    ) -> Literal["replay", "record"]:
        """Serve every `/v1` request from the cassettes in `directory` (`replay`), or pass them
        through to `upstream` and write one cassette per exchange there (`record`); `once`
        replays if the directory holds cassettes, else records. Returns what it does. Until
        `reset()`, scripts and fixtures are not consulted."""
        deck = make_deck(directory, mode, upstream=upstream, timing=timing)
        set_cassette_deck(self.app, deck)
        return "record" if isinstance(deck, Recording) else "replay"
