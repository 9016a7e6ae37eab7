"""`python -m fake_upstream` as a user runs it, and the pytest plugin's import cost."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.fake_upstream.cli_process import running_fake_upstream


def test_serves_on_a_free_port_and_stops_on_sigint() -> None:
    # running_fake_upstream checks the listening line, then that SIGINT ends it with status 0
    # and no traceback.
    with running_fake_upstream("--latency", "0") as url:
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 200
        # The CLI serves through the reset-capable runner, so this is a real TCP reset.
        with pytest.raises(httpx.ReadError, match="Connection reset by peer"):
            httpx.post(
                f"{url}/v1/chat/completions",
                json={"messages": []},
                headers={"x-fake-scenario": "reset_mid_stream"},
                timeout=10,
            )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--port", "http"], "argument --port: invalid port 'http': not an integer"),
        (["--port", "70000"], "argument --port: invalid port 70000: must be 0-65535"),
        (["--latency", "-1"], "argument --latency: invalid latency '-1': must be >= 0 seconds"),
        (["--latency", "nan"], "argument --latency: invalid latency 'nan': must be >= 0 seconds"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(arguments: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fake_upstream", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def test_pytest_plugin_imports_without_fastapi() -> None:
    code = (
        "import sys, fake_upstream.pytest_plugin; "
        "heavy = {'fastapi', 'uvicorn', 'httpx', 'starlette'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
