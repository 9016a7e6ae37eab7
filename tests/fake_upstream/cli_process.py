"""Running `python -m fake_upstream` as a user would: started, read, stopped on events."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator


def read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """The first stdout line, or fail after `timeout` seconds (readline could block forever).
    Reads the raw fd: a buffered reader would hide data from select()."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    received = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in received:
            if not selector.select(max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"no line from {process.args} within {timeout}s: {received!r}")
            data = os.read(fd, 4096)
            if not data:
                raise AssertionError(f"{process.args} exited early: {received!r}")
            received += data
    return received.decode().splitlines()[0]


@contextlib.contextmanager
def running_fake_upstream(*arguments: str) -> Iterator[str]:
    """`python -m fake_upstream --port 0 ARGUMENTS`; yields its URL once it listens. On leaving,
    SIGINT, and the process must exit 0 without a traceback."""
    command = [sys.executable, "-m", "fake_upstream", *arguments, "--port", "0"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        try:
            line = read_line(process, timeout=20)
            assert line.startswith("fake-upstream listening on http://127.0.0.1:"), line
            yield line.split()[3]
        except BaseException:
            process.kill()
            raise
        finally:
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert b"Traceback" not in stderr, stderr


def run_fake_upstream(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion (for arguments it must refuse)."""
    return subprocess.run(
        [sys.executable, "-m", "fake_upstream", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
