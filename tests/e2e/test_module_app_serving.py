"""`llmproxy.app:app` as other ASGI servers load it: importing it reads no setting, and plain
uvicorn (without `ProxyHttpProtocol`) gets one warning line naming `llmproxy serve`."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx

from llmproxy.app import UNHARDENED_WARNING
from tests.support import free_port, llmproxy_environment, serve_subprocess, wait_until_ready

if TYPE_CHECKING:
    from fake_upstream.server import FakeUpstreamServer

DEADLINE = 30.0
BAD_SETTINGS = {"LLMPROXY_UPSTREAM_URL": "ftp://nowhere/v1", "LLMPROXY_PORT": "not-a-port"}
STARTED = "Application startup complete."


def test_importing_the_app_reads_no_setting() -> None:
    imported = subprocess.run(
        [sys.executable, "-c", "from llmproxy.app import app, get_configuration; print(app)"],
        env=llmproxy_environment(**BAD_SETTINGS),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    assert "ProxyApp" in imported.stdout


def test_a_bad_setting_stops_the_module_app_at_start_up() -> None:
    """The settings are read when the server starts the app, so the same ones fail there."""
    started = subprocess.run(
        [sys.executable, "-m", "uvicorn", "llmproxy.app:app", "--port", str(free_port())],
        env=llmproxy_environment(LLMPROXY_UPSTREAM_URL="ftp://nowhere/v1"),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert started.returncode != 0
    assert "LLMPROXY_UPSTREAM_URL" in started.stderr


def output_of(process: subprocess.Popen[str] | subprocess.Popen[bytes]) -> str:
    """What the exited process wrote; its pipe closed."""
    assert process.stdout is not None
    with process.stdout as output:
        written = output.read()
    return written.decode() if isinstance(written, bytes) else written


@contextlib.contextmanager
def plain_uvicorn(env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`python -m uvicorn llmproxy.app:app`, ready; stopped with SIGINT at the end."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "llmproxy.app:app", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)  # type: ignore[arg-type]  # only polls it
        yield process, url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=DEADLINE)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=DEADLINE)


def test_plain_uvicorn_serves_the_module_app_with_one_warning_line(
    fake_upstream: FakeUpstreamServer,
) -> None:
    env = llmproxy_environment(LLMPROXY_UPSTREAM_URL=fake_upstream.base_url)
    with plain_uvicorn(env) as (process, url):
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            timeout=DEADLINE,
        )
        assert answer.status_code == 200
    lines = output_of(process).splitlines()
    assert STARTED in "\n".join(lines)
    assert [line for line in lines if "llmproxy serve" in line] == [UNHARDENED_WARNING]


def test_llmproxy_serve_gives_no_such_warning(fake_upstream: FakeUpstreamServer) -> None:
    env = llmproxy_environment(LLMPROXY_UPSTREAM_URL=fake_upstream.base_url)
    with serve_subprocess(env, output=subprocess.PIPE) as (process, url):
        assert httpx.get(f"{url}/healthz", timeout=DEADLINE).status_code == 200
    output = output_of(process)
    assert STARTED in output  # the start-up was captured, so a warning would have been too
    assert "hardened" not in output
