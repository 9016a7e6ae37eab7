"""The slow-client probe of issue 10: slow-header and idle connections against `llmproxy serve`.

Opens SLOW connections that send a partial request head and then one header line every
--trickle seconds, and IDLE connections that send nothing, all on 127.0.0.1, while one client
keeps sending normal requests. Reports when the proxy closed them (it must within
client_header_timeout + 1 s) and how the normal requests fared meanwhile.

    python bench/slow_clients.py                      # 1,000 slow + 3,000 idle, 10 s timeout
    python bench/slow_clients.py --slow 100 --idle 300 --header-timeout 3

Runs its own upstream (a minimal asyncio HTTP server) and `python -m llmproxy serve`, with the
proxy's descriptor limit at --nofile (1,024, as in the review) unless the hard limit is lower.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # Cancelled when the probe ends: that ends the connection too.
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":", 1)[1]))
            writer.write(ANSWER)
            await writer.drain()
    writer.close()


async def wait_closed(reader: asyncio.StreamReader) -> float:
    """Read until the proxy closes the connection; the monotonic time it did."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass
    return time.monotonic()


async def slow_connection(port: int, trickle: float) -> tuple[float, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\n")
    closed = asyncio.ensure_future(read_all(reader))
    while not closed.done():
        with contextlib.suppress(ConnectionError):
            writer.write(b"X-Slow: 1\r\n")
        await asyncio.wait([closed], timeout=trickle)
    writer.close()
    return closed.result()


async def read_all(reader: asyncio.StreamReader) -> tuple[float, bytes]:
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            data += chunk
    return time.monotonic(), data


async def idle_connection(port: int) -> tuple[float, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    result = await read_all(reader)
    writer.close()
    return result


async def normal_requests(port: int, stop: asyncio.Event) -> list[float | None]:
    """One request at a time on new connections; latency in s, or None for no answer in 5 s."""
    latencies: list[float | None] = []
    request = b"GET /v1/models HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
    while not stop.is_set():
        started = time.monotonic()
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                answer = await reader.read()
                writer.close()
            latencies.append(
                time.monotonic() - started if answer.startswith(b"HTTP/1.1 200") else None
            )
        except (TimeoutError, OSError):
            latencies.append(None)
        await asyncio.sleep(0.1)
    return latencies


async def probe(arguments: argparse.Namespace) -> int:
    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    upstream_port = server.sockets[0].getsockname()[1]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
    env["LLMPROXY_UPSTREAM_URL"] = f"http://127.0.0.1:{upstream_port}/v1"
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = min(arguments.nofile, hard)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proxy = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
        [
            sys.executable,
            "-m",
            "llmproxy",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--client-header-timeout",
            str(arguments.header_timeout),
        ],
        env=env,
        preexec_fn=limit,  # the proxy's own descriptor limit, as in the review
    )
    try:
        give_up = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            assert time.monotonic() < give_up, "llmproxy did not start"
            await asyncio.sleep(0.05)
        stop = asyncio.Event()
        normal = asyncio.ensure_future(normal_requests(port, stop))
        opened = time.monotonic()
        slow = [
            asyncio.ensure_future(slow_connection(port, arguments.trickle))
            for _ in range(arguments.slow)
        ]
        idle = [asyncio.ensure_future(idle_connection(port)) for _ in range(arguments.idle)]
        results = await asyncio.gather(*slow, *idle, return_exceptions=True)
        stop.set()
        latencies = await normal
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
        server.close()
    failed = [r for r in results if isinstance(r, BaseException)]
    done = [r for r in results if not isinstance(r, BaseException)]
    closed_after = [when - opened for when, _ in done]
    answered_408 = sum(1 for _, data in done[: arguments.slow] if b" 408 " in data[:20])
    answered = [x for x in latencies if x is not None]
    print(f"proxy descriptor limit: {nofile}; client_header_timeout: {arguments.header_timeout} s")
    print(
        f"connections: {arguments.slow} slow-header + {arguments.idle} idle; "
        f"failed to open: {len(failed)}"
    )
    if closed_after:
        print(
            f"closed by the proxy after: min {min(closed_after):.2f} s, median "
            f"{statistics.median(closed_after):.2f} s, max {max(closed_after):.2f} s"
        )
    print(f"slow-header connections answered 408 before the close: {answered_408}")
    print(
        f"normal requests meanwhile: {len(answered)} answered of {len(latencies)}"
        + (f", max latency {max(answered) * 1000:.0f} ms" if answered else "")
    )
    ok = not failed and closed_after and max(closed_after) <= arguments.header_timeout + 1
    ok = bool(ok) and len(answered) == len(latencies)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slow", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=3000)
    parser.add_argument("--trickle", type=float, default=2.0, help="seconds between header lines")
    parser.add_argument("--header-timeout", type=float, default=10.0)
    parser.add_argument("--nofile", type=int, default=8192, help="the proxy's RLIMIT_NOFILE")
    arguments = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds them all
    raise SystemExit(asyncio.run(probe(arguments)))


if __name__ == "__main__":
    main()
