"""File descriptors of `llmproxy serve` (issue 10, item 1): raised at start-up, watched after.

The proxy runs as a child process whose RLIMIT_NOFILE the test sets, so exhausting it touches
nothing else; the test's own connections hold the descriptors (nothing is answered before
`client_header_timeout`, 60 s by default, so they stay open).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.support import free_port, llmproxy_environment, wait_until_ready

pytestmark = pytest.mark.e2e

DEADLINE = 15.0


class Output:
    """A child's merged stdout and stderr, read by a thread so the pipe never fills."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for raw in stream:  # type: ignore[attr-defined]
            with self._changed:
                self.lines.append(raw.decode(errors="replace"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, deadline: float = DEADLINE) -> str:
        """The first line matching `pattern`, waiting for it up to `deadline` seconds."""
        give_up = time.monotonic() + deadline
        with self._changed:
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                left = give_up - time.monotonic()
                assert left > 0, f"no line matching {pattern!r} in:\n{''.join(self.lines)}"
                self._changed.wait(left)

    def close(self, stream: object) -> None:
        self._thread.join(DEADLINE)
        stream.close()  # type: ignore[attr-defined]

    def matching(self, pattern: str) -> list[str]:
        with self._changed:
            return [line for line in self.lines if re.search(pattern, line)]


def limit_descriptors(soft: int, hard: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


@contextlib.contextmanager
def served(soft: int, hard: int) -> Iterator[tuple[subprocess.Popen[bytes], str, Output]]:
    """`llmproxy serve` with RLIMIT_NOFILE (soft, hard), in front of nothing (no upstream)."""
    port = free_port()
    env = llmproxy_environment(LLMPROXY_UPSTREAM_URL=f"http://127.0.0.1:{free_port()}/v1")
    process = subprocess.Popen(
        [sys.executable, "-m", "llmproxy", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=limit_descriptors(soft, hard),  # only setrlimit: safe before exec
    )
    output = Output(process.stdout)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        yield process, url, output
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        output.close(process.stdout)


def open_descriptors(pid: int) -> tuple[int, int]:
    """(soft, hard) "Max open files" of process `pid`."""
    with open(f"/proc/{pid}/limits", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


@pytest.mark.skipif(not os.path.exists("/proc/self/limits"), reason="reads /proc/<pid>/limits")
def test_the_soft_descriptor_limit_is_raised_to_the_hard_one_at_start_up() -> None:
    hard = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    with served(64, hard) as (process, _, output):
        assert open_descriptors(process.pid) == (hard, hard)
        output.wait_for(rf"file descriptor limit raised from 64 to {hard}")


def test_running_out_of_descriptors_is_one_warning_not_a_traceback_per_connection() -> None:
    limit = 96
    with served(limit, limit) as (_, url, output):
        held: list[socket.socket] = []
        try:
            # Far more connections than the proxy has descriptors for: the ones past the limit
            # are dropped by the event loop; the proxy must notice and say so, once.
            for _ in range(limit + 60):
                held.append(socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))))
            output.wait_for(r"out of file descriptors")
            # More failed accepts (and probes) over the next seconds: still that one warning.
            for _ in range(40):
                with contextlib.suppress(OSError):
                    held.append(
                        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), 2)
                    )
            output.wait_for(r"out of file descriptors")
        finally:
            for connection in held:
                connection.close()
        # Once the connections are gone, requests are answered again.
        give_up = time.monotonic() + DEADLINE
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < give_up, "the proxy did not recover"
            time.sleep(0.05)  # polling recovery with a deadline
        assert len(output.matching(r"out of file descriptors")) == 1
        assert output.matching(r"Traceback") == []
