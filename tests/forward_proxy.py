"""A real forward proxy on loopback for the egress tests (issue 14): proxy.py from PyPI.

`start_forward_proxy` runs `python -m proxy` as a child process on a port the OS picks (it
writes the port to a file), waits until it accepts connections, with a deadline, and stops its
whole process group at the end. proxy.py writes one access line per client connection, when
that connection closes, to a log file the tests read: `settled_access_log` sends a marker
request of its own and waits for the marker's line, so every connection closed before it has
been logged by then (one worker, one event loop: lines come in the order connections close).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STARTUP_DEADLINE = 10.0
LOG_DEADLINE = 10.0

# proxy.py's access lines (proxy/http/proxy/server.py): `client - METHOD host:port[path] - ...`.
_ACCESS_LINE = re.compile(
    r"server\.access_log:\d+ - (?P<client>\S+) - (?P<method>\S+) (?P<target>\S+)"
)
_markers = itertools.count(1)


@dataclass(frozen=True, slots=True)
class AccessLine:
    """One client connection proxy.py served: its first request's method and target."""

    method: str
    target: str  # `host:port` for CONNECT, `host:port/path` for a forwarded request
    text: str


@dataclass(frozen=True, slots=True)
class ForwardProxy:
    """A running proxy.py: where it listens and where its log goes."""

    host: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        """`host:port`, as llmproxy's error messages name it."""
        return f"{self.host}:{self.port}"

    def url(self, userinfo: str | None = None) -> str:
        """The proxy's URL, with `user:password` in it when given."""
        credentials = f"{userinfo}@" if userinfo is not None else ""
        return f"http://{credentials}{self.address}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def access_log(self) -> list[AccessLine]:
        """The access lines written so far (connections still open are not in it yet)."""
        lines = []
        for text in self.log_text().splitlines():
            match = _ACCESS_LINE.search(text)
            if match is not None:
                lines.append(AccessLine(match["method"], match["target"], text))
        return lines

    def settled_access_log(self) -> list[AccessLine]:
        """The access lines of every connection closed before this call, markers left out."""
        marker = f"/forward-proxy-marker-{os.getpid()}-{next(_markers)}"
        # Port 1 on loopback refuses: proxy.py answers 502 (or 407 if it wants credentials),
        # closes, and logs the request's path either way.
        request = f"GET http://127.0.0.1:1{marker} HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n"
        with socket.create_connection((self.host, self.port), timeout=LOG_DEADLINE) as probe:
            probe.sendall(request.encode("ascii"))
            while probe.recv(65536):
                pass  # until proxy.py closes its side
        give_up = time.monotonic() + LOG_DEADLINE
        while True:
            lines = self.access_log()
            if any(line.target.endswith(marker) for line in lines):
                return [line for line in lines if "/forward-proxy-marker-" not in line.target]
            assert time.monotonic() < give_up, f"proxy.py never logged {marker}:\n{self.log_text()}"
            time.sleep(0.01)  # polling a file with a deadline

    def connects(self) -> list[AccessLine]:
        """The settled CONNECT tunnels."""
        return [line for line in self.settled_access_log() if line.method == "CONNECT"]

    @contextlib.contextmanager
    def unreachable(self) -> Iterator[None]:
        """proxy.py stopped (SIGSTOP) with its accept queue full: new connections time out
        in the TCP handshake, as to a black-holed proxy. Needs `backlog=1` at start."""
        os.killpg(self.process.pid, signal.SIGSTOP)
        held: list[socket.socket] = []
        try:
            give_up = time.monotonic() + STARTUP_DEADLINE
            while True:  # the queue holds backlog + 1 connections; the next SYN is dropped
                probe = socket.socket()
                probe.settimeout(0.2)
                try:
                    probe.connect((self.host, self.port))
                except TimeoutError:
                    probe.close()
                    break
                held.append(probe)
                assert time.monotonic() < give_up, "proxy.py's accept queue never filled"
            yield
        finally:
            for probe in held:
                probe.close()
            os.killpg(self.process.pid, signal.SIGCONT)


def _wait_until_listening(process: subprocess.Popen[bytes], port_file: Path) -> int:
    give_up = time.monotonic() + STARTUP_DEADLINE
    while True:
        assert process.poll() is None, f"proxy.py exited with {process.returncode} while starting"
        text = port_file.read_text().strip() if port_file.exists() else ""
        if text:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", int(text)), 1),
            ):
                return int(text)
        assert time.monotonic() < give_up, "proxy.py did not start listening"
        time.sleep(0.01)  # polling readiness with a deadline


@contextlib.contextmanager
def start_forward_proxy(
    directory: Path, *, basic_auth: str | None = None, backlog: int = 100
) -> Iterator[ForwardProxy]:
    """proxy.py on a free loopback port, its log in `directory`; `basic_auth` is `user:pass`,
    `backlog` the length of its accept queue (proxy.py's default: 100)."""
    directory.mkdir(parents=True, exist_ok=True)
    port_file = directory / "forward-proxy.port"
    log_path = directory / "forward-proxy.log"
    port_file.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "proxy",
        "--hostname",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--num-workers",
        "1",
        "--num-acceptors",
        "1",
        "--backlog",
        str(backlog),
        "--log-level",
        "INFO",
        "--log-file",
        str(log_path),
    ]
    if basic_auth is not None:
        command += ["--basic-auth", basic_auth]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: its acceptor and worker go with it
        env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
    )
    try:
        port = _wait_until_listening(process, port_file)
        yield ForwardProxy("127.0.0.1", port, log_path, process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STARTUP_DEADLINE)
        # Whatever is left of its group (an acceptor or worker that did not stop) goes as well.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STARTUP_DEADLINE)
