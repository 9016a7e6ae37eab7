"""`llmproxy demo`: the fake upstream and the proxy on free loopback ports, and three calls.

Both servers run as child processes (`python -m fake_upstream`, `python -m llmproxy serve`),
exactly as a user would start them; nothing leaves the loopback interface.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx

READY_DEADLINE = 20.0
DEMO_KEY = "sk-demo-upstream-key"  # a stand-in: the demo must show that it never comes back


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_ready(url: str, process: subprocess.Popen[bytes], name: str) -> None:
    """Poll a readiness URL until it answers 200, the process dies, or the deadline passes."""
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode} while starting")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{name} was not ready within {READY_DEADLINE:.0f} s")


@contextlib.contextmanager
def _child(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A child server whose output goes to a file (a pipe nobody reads would fill and block it),
    shown only if the demo fails."""
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter running our own packages
            [sys.executable, *args], env=env, stdout=output, stderr=subprocess.STDOUT
        )
        try:
            yield process
        except BaseException:
            output.seek(0)
            sys.stderr.write(output.read().decode(errors="replace"))
            raise
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _show(title: str) -> None:
    print(f"\n== {title}")


def run_demo() -> int:
    """Run the demo; the exit status is 0 when every step behaved as shown."""
    if importlib.util.find_spec("fake_upstream") is None:
        print("llmproxy demo: the fake_upstream package is not installed; install llmproxy fully.")
        return 1
    upstream_port, proxy_port = _free_port(), _free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    proxy = f"http://127.0.0.1:{proxy_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
    proxy_env = env | {
        "LLMPROXY_UPSTREAM_URL": f"{upstream}/v1",
        "LLMPROXY_UPSTREAM_API_KEY": DEMO_KEY,
    }
    print("llmproxy demo: a fake OpenAI-compatible upstream and the proxy in front of it")
    print(f"  fake upstream  {upstream}/v1")
    print(f"  llmproxy       {proxy}/v1   (adds the upstream key; clients never see it)")
    fake_args = ["-m", "fake_upstream", "--host", "127.0.0.1", "--port", str(upstream_port)]
    proxy_args = ["-m", "llmproxy", "serve", "--host", "127.0.0.1", "--port", str(proxy_port)]
    with _child(fake_args, env) as fake, _child(proxy_args, proxy_env) as server:
        _wait_ready(f"{upstream}/v1/models", fake, "fake upstream")
        _wait_ready(f"{proxy}/readyz", server, "llmproxy")
        with httpx.Client(base_url=proxy, timeout=30.0) as client:
            ok = _plain_call(client) and _streamed_call(client) and _rate_limited_call(client)
    print("\nDemo finished." if ok else "\nDemo FAILED: see above.")
    return 0 if ok else 1


def _plain_call(client: httpx.Client) -> bool:
    _show("1. A plain chat completion")
    request = {"model": "fake-model", "messages": [{"role": "user", "content": "Say hello"}]}
    print("POST /v1/chat/completions", json.dumps(request))
    response = client.post("/v1/chat/completions", json=request)
    print(f"<- {response.status_code}, x-request-id: {response.headers.get('x-request-id')}")
    if response.status_code != 200:
        print(response.text)
        return False
    message = response.json()["choices"][0]["message"]["content"]
    print(f"   assistant: {message!r}")
    return DEMO_KEY not in response.text


def _streamed_call(client: httpx.Client) -> bool:
    _show("2. A streamed chat completion, printed token by token as it arrives")
    request = {
        "model": "fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me something"}],
    }
    start = time.monotonic()
    pieces: list[str] = []
    with client.stream(
        "POST", "/v1/chat/completions", json=request, headers={"x-fake-scenario": "slow_stream"}
    ) as response:
        print(f"<- {response.status_code} {response.headers.get('content-type')}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                print(f"   +{time.monotonic() - start:5.2f}s  [DONE]")
                break
            delta = json.loads(data)["choices"][0]["delta"].get("content") or ""
            if delta:
                pieces.append(delta)
                print(f"   +{time.monotonic() - start:5.2f}s  {delta!r}")
    print(f"   assistant: {''.join(pieces)!r}")
    return response.status_code == 200 and bool(pieces)


def _rate_limited_call(client: httpx.Client) -> bool:
    _show("3. An upstream 429, passed through unchanged")
    response = client.post(
        "/v1/chat/completions",
        json={"model": "fake-model", "messages": []},
        headers={"x-fake-scenario": "rate_limited"},
    )
    print(f"<- {response.status_code}, retry-after: {response.headers.get('retry-after')}")
    print(f"   body: {response.text}")
    return response.status_code == 429 and DEMO_KEY not in response.text
