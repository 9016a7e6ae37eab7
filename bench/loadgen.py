"""Python load generators: the fallback when wrk is not installed, and the slow-streams client.

  python loadgen.py load URL --connections 64 --duration 5 [--max-requests N]
  python loadgen.py slow URL --streams 1000 [--timeout 120]

`load` is a closed loop like wrk: each keep-alive connection sends the next POST as soon as
the previous answer has been read in full (asyncio protocol + httptools, uvloop when
installed). `slow` opens N SSE streams at once with one aiohttp session and checks that every
stream has all its events and ends in `[DONE]`. Both print one JSON object and stop at the
duration or count given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Coroutine
from typing import Any, cast
from urllib.parse import urlsplit

from payloads import REQUEST_BODY, REQUEST_HEADERS, SLOW_EVENTS


def run_fast(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def build_request(url: str) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    head = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc}"]
    head += [f"{name}: {value}" for name, value in REQUEST_HEADERS]
    head.append(f"Content-Length: {len(REQUEST_BODY)}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + REQUEST_BODY
    return parts.hostname or "127.0.0.1", parts.port or 80, request


class _Stats:
    def __init__(self, deadline: float, max_requests: int) -> None:
        self.deadline = deadline
        self.max_requests = max_requests
        self.latencies: list[float] = []
        self.non2xx = 0
        self.errors = 0

    def more(self) -> bool:
        return time.perf_counter() < self.deadline and len(self.latencies) < self.max_requests


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending requests back to back."""

    def __init__(self, request: bytes, stats: _Stats, done: asyncio.Future[None]) -> None:
        import httptools

        self.request = request
        self.stats = stats
        self.done = done
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.sent = 0.0

    def _send(self) -> None:
        assert self.transport is not None
        self.sent = time.perf_counter()
        self.transport.write(self.request)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._send()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:  # a malformed answer: count it, end this connection
            self.stats.errors += 1
            self._finish()

    def on_message_complete(self) -> None:
        self.stats.latencies.append(time.perf_counter() - self.sent)
        if not 200 <= self.parser.get_status_code() < 400:
            self.stats.non2xx += 1
        if self.stats.more():
            self._send()
        else:
            self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.stats.errors += 1  # closed before its answer was complete
            self.done.set_result(None)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()


async def _connection_loop(host: str, port: int, request: bytes, stats: _Stats) -> None:
    loop = asyncio.get_running_loop()
    while stats.more():
        done: asyncio.Future[None] = loop.create_future()
        try:
            await loop.create_connection(
                lambda done=done: _Connection(request, stats, done), host, port
            )
        except OSError:
            stats.errors += 1
            await asyncio.sleep(0.01)
            continue
        await done


async def load(url: str, connections: int, duration: float, max_requests: int) -> dict[str, Any]:
    host, port, request = build_request(url)
    started = time.perf_counter()
    cpu_started = time.process_time()
    stats = _Stats(started + duration, max_requests)
    tasks = [_connection_loop(host, port, request, stats) for _ in range(connections)]
    await asyncio.wait_for(asyncio.gather(*tasks), duration + 30)
    elapsed = time.perf_counter() - started
    latencies = sorted(stats.latencies)
    result: dict[str, Any] = {
        "requests": len(latencies),
        "duration_s": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1),
        "non2xx": stats.non2xx,
        "errors": stats.errors,
        "generator_cpu_pct": round(100 * (time.process_time() - cpu_started) / elapsed, 1),
    }
    for name, fraction in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99)):
        value = percentile(latencies, fraction)
        result[name] = None if value is None else round(value * 1000, 3)
    return result


async def _one_stream(session: Any, url: str, started: float) -> float:
    headers = dict(REQUEST_HEADERS)
    body = REQUEST_BODY[:-1] + b',"stream":true}'
    async with session.post(url, data=body, headers=headers) as response:
        data = b"".join([chunk async for chunk in response.content.iter_any()])
    if (
        response.status != 200
        or not data.endswith(b"data: [DONE]\n\n")
        or data.count(b"data: ") != SLOW_EVENTS
    ):
        raise RuntimeError(f"bad stream: status {response.status}, {len(data)} bytes")
    return time.perf_counter() - started


async def slow(url: str, streams: int, stream_timeout: float) -> dict[str, Any]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=stream_timeout)
    ) as session:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(_one_stream(session, url, started) for _ in range(streams)), return_exceptions=True
        )
        elapsed = time.perf_counter() - started
    done = sorted(r for r in results if isinstance(r, float))
    errors = sorted({repr(r)[:160] for r in results if not isinstance(r, float)})
    return {
        "streams": streams,
        "duration_s": round(elapsed, 3),
        "ok": len(done),
        "failed": streams - len(done),
        "median_stream_s": round(percentile(done, 0.5) or 0, 3),
        "errors": errors[:5],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("load")
    p.add_argument("url")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--max-requests", type=int, default=2_000_000)
    p = commands.add_parser("slow")
    p.add_argument("url")
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost"):
        sys.exit("loadgen: loopback targets only")
    if args.command == "load":
        result = run_fast(load(args.url, args.connections, args.duration, args.max_requests))
    else:
        result = run_fast(slow(args.url, args.streams, args.timeout))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
