"""Run the proxy as a real server inside a test process: `ProxyServer(configuration)`.

The server runs in a background thread with its own event loop, so synchronous clients (the
OpenAI SDK's `OpenAI`) and asynchronous ones alike can call it. Start-up waits on an event set
once uvicorn listens, with a deadline; nothing sleeps.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp

from llmproxy.app import ProxyApp, create_app
from llmproxy.config import Configuration, get_configuration
from llmproxy.protocol import ProxyHttpProtocol
from llmproxy.websocket_protocol import websocket_server_options

STARTUP_DEADLINE = 10.0


def proxy_app(configuration: Configuration) -> ProxyApp:
    """A proxy app whose configuration is injected the FastAPI way (`dependency_overrides`)."""
    app = create_app()
    app.dependency_overrides[get_configuration] = lambda: configuration
    return app


class _NotifyingServer(uvicorn.Server):
    """uvicorn.Server that sets a threading.Event once it is listening."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self._ready.set()


class ProxyServer:
    """The proxy on a free loopback port in a background thread; use it as a context manager."""

    def __init__(
        self,
        configuration: Configuration,
        *,
        log_level: str = "warning",
        wrap_app: Callable[[ASGIApp], ASGIApp] | None = None,
    ) -> None:
        """`wrap_app` puts ASGI middleware of the test's around the proxy (e.g. to record)."""
        # Binding here (not in uvicorn) makes the port ours before the thread starts: no race.
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        self.app = proxy_app(configuration)
        config = uvicorn.Config(
            wrap_app(self.app) if wrap_app else self.app,
            log_level=log_level,
            lifespan="on",
            http=ProxyHttpProtocol,
            **websocket_server_options(configuration.max_ws_message_bytes),
            server_header=False,
            date_header=False,
        )
        self._ready = threading.Event()
        self._server = _NotifyingServer(config, self._ready)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def start(self) -> ProxyServer:
        """Start serving; returns once the server listens (or raises after the deadline)."""
        self._thread.start()
        if not self._ready.wait(STARTUP_DEADLINE) or not self._thread.is_alive():
            self.stop()
            raise RuntimeError(f"llmproxy did not start on {self.url}")
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread (in-flight requests finish first)."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(STARTUP_DEADLINE)
        self._socket.close()

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
