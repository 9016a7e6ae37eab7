"""WebSocket pass-through (issue 12): round trips on one session, and the RSS of idle sessions.

    python bench/websockets_bench.py                          # 2,000 round trips, 1,000 sessions
    python bench/websockets_bench.py --round-trips 500 --sessions 200 --cycles 3
    python bench/websockets_bench.py --upstream-url http://127.0.0.1:8090 \\
        --proxy-url http://127.0.0.1:8080                     # servers already running

1. Round trips, of two kinds, on one session per target. The main figure is an echo: the
   fake upstream sends a client's `fake.echo` event back unchanged, so the client sends a
   1 KiB `{"type": "fake.echo", ...}` text message and the clock stops when the same text
   comes back (checked byte for byte). The second is the Realtime exchange: a 1 KiB
   `response.create` (padding under `response.metadata`) timed until `response.done`; the
   handshake's `x-fake-script: {"chunks": ["ok"]}` makes its answer three events
   (`response.created`, one `response.output_text.delta`, `response.done`, ~1.1 KiB). The
   padding is random and fresh for every message, so permessage-deflate cannot shrink a
   message to a back-reference to the previous one. The session directly against the fake's
   `/v1/realtime` and the one through the proxy are open side by side, warmed up, then
   measured in alternating blocks of 100 round trips, so drift on the machine moves both
   alike. Each wait is bounded (10 s) and so is the phase (--time-limit).
2. Idle sessions. VmRSS (from /proc/<pid>/status, summed over the process and its children)
   of the proxy and of the fake upstream, then --sessions sessions are opened through the
   proxy (at most --concurrency handshakes at once, each waiting for `session.created`, so
   the proxy's upstream session exists too), VmRSS again 1 s after the last one opened, then
   they are all closed and VmRSS is read once more. Per session = (with - before) / sessions.
   The fake keeps a journal entry per session, which is part of its figure. --cycles N
   repeats this step N times: whether a closed session's memory comes back for the next one
   shows in the later cycles' rows (descriptors show whether the sessions were let go). When
   the proxy refuses the upgrade, the sessions are opened directly against the fake instead
   and only its figure is given.

By default the script starts `python -m fake_upstream` and `python -m llmproxy serve`
(LLMPROXY_UPSTREAM_URL = the fake's /v1) on free 127.0.0.1 ports and stops them at the end;
with --upstream-url (and --proxy-url) it uses running servers instead, found by their
listening port for the RSS. Every target must be a loopback address. The client is the
`websockets` asyncio client with its defaults (permessage-deflate offered, as the OpenAI SDK
does) unless --no-compression; keep-alive pings are off so idle sessions stay idle.
Exit status 1 when the proxy part could not be measured (for instance a refused upgrade).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SCRIPT = json.dumps({"chunks": ["ok"]})
WAIT_S = 10.0  # any one handshake, message or close
BLOCK = 100  # round trips per target before switching to the other
_T = TypeVar("_T")


class TargetError(Exception):
    """A target could not be measured; the message says what it answered."""


# ------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment for a started process: no inherited LLMPROXY_* or proxy settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LLMPROXY_") and k.lower() not in ("http_proxy", "https_proxy")
    }
    return {**env, **extra}


class Processes:
    """The servers this run started; each in its own session, stopped by its own id."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.logdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=child_env(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.running):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                except ProcessLookupError:
                    pass
        self.running.clear()

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"port {port} not listening after {timeout:.0f} s")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def rss_kib(pid: int) -> int:
    """VmRSS of the process and its descendants, in KiB."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def descriptors(pid: int) -> int:
    """Open descriptors of the process and its descendants."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{p}/fd"))
    return total


def listening_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1/::1 `port` (the topmost one, if workers share the
    socket), found through /proc/net/tcp and the processes' descriptors; None when not ours."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    holders: dict[int, int] = {}  # pid -> parent pid
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                stat = (entry / "stat").read_text()
                holders[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tops = [pid for pid, parent in holders.items() if parent not in holders]
    return min(tops) if tops else None


# ------------------------------------------------------------------------- targets
@dataclass
class Target:
    name: str
    url: str  # ws://.../v1/realtime?model=...
    pid: int | None
    error: str | None = None
    extensions: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)  # kind -> ms
    bytes_down: dict[str, int] = field(default_factory=dict)  # kind -> bytes of the answer


def realtime_url(base: str) -> str:
    """ws://host:port/v1/realtime?model=gpt-realtime from an http(s) or ws(s) base URL; the
    host must be a loopback address."""
    parts = urlsplit(base)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise SystemExit(f"not an http:// or ws:// URL: {base!r}")
    host = parts.hostname
    loopback = host == "localhost"
    with contextlib.suppress(ValueError):
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    if not loopback:
        raise SystemExit(f"{base!r}: this bench only talks to loopback addresses")
    path = parts.path.rstrip("/")
    if path.endswith("/realtime"):
        path = path.removesuffix("/realtime")
    if not path.endswith("/v1"):
        path += "/v1"
    return urlunsplit((scheme, parts.netloc, path + "/realtime", "model=gpt-realtime", ""))


def port_of(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "wss" else 80)


async def open_session(url: str, compression: str | None) -> ClientConnection:
    """A session that got its `session.created`; TargetError with the answer otherwise."""
    try:
        ws = await connect(
            url,
            additional_headers={"x-fake-script": SCRIPT},
            compression=compression,
            proxy=None,  # loopback only, whatever the environment says
            open_timeout=WAIT_S,
            close_timeout=2,
            ping_interval=None,  # idle means idle; and no ping lands inside a round trip
        )
    except InvalidStatus as exc:
        response = exc.response
        body = bytes(response.body or b"").decode(errors="replace").strip()
        body = " ".join(body.split())[:200]
        raise TargetError(
            f"refused the WebSocket upgrade: HTTP {response.status_code} "
            f"{response.reason_phrase}: {body or '(no body)'}"
        ) from None
    except InvalidHandshake as exc:
        raise TargetError(f"WebSocket handshake failed: {exc}") from None
    except (OSError, TimeoutError) as exc:
        raise TargetError(f"could not connect: {exc!r}") from None
    try:
        async with asyncio.timeout(WAIT_S):
            first = await ws.recv()
    except (ConnectionClosed, TimeoutError) as exc:
        await ws.close()
        raise TargetError(f"no session.created after the upgrade: {exc!r}") from None
    if not isinstance(first, str) or '"session.created"' not in first[:40]:
        await ws.close()
        raise TargetError(f"first event is not session.created: {first[:200]!r}")
    return ws


ECHO = "fake.echo"
RESPONSE = "response.create"
KINDS = (ECHO, RESPONSE)


def messages(kind: str, count: int, size: int) -> list[str]:
    """`count` distinct `kind` events of exactly `size` bytes each (random base64 padding)."""
    out = []
    for number in range(count):
        event: dict[str, Any] = {"type": kind, "event_id": f"evt_bench_{number:08d}"}
        # Under response.metadata for response.create: the fake adds no metadata to its count
        # of prompt tokens, which would grow with every message.
        holder = event if kind == ECHO else event.setdefault("response", {"metadata": {}})
        padded = holder if kind == ECHO else holder["metadata"]
        padded["padding"] = ""
        room = size - len(json.dumps(event, separators=(",", ":")))
        if room < 0:
            raise SystemExit(f"--message-bytes must be at least {size - room}")
        padded["padding"] = base64.b64encode(os.urandom(room)).decode()[:room]
        text = json.dumps(event, separators=(",", ":"))
        assert len(text) == size, (len(text), size)
        out.append(text)
    return out


async def round_trip(ws: ClientConnection, kind: str, message: str) -> tuple[float, int]:
    """Send one message; ms until its echo (ECHO) or `response.done` (RESPONSE), bytes read."""
    received = 0
    started = time.perf_counter()
    async with asyncio.timeout(WAIT_S):
        await ws.send(message)
        while True:
            event = await ws.recv()
            now = time.perf_counter()
            if isinstance(event, bytes):
                raise TargetError(f"a binary message in answer: {event[:200]!r}")
            received += len(event)
            if kind == ECHO:
                if event != message:
                    raise TargetError(f"the echo differs from the message: {event[:300]}")
                break
            if event.startswith('{"type":"response.done"'):
                break
            if not event.startswith('{"type":"response.'):  # the fake's order; else parse it
                try:
                    answered = json.loads(event).get("type")
                except (ValueError, AttributeError):
                    answered = None
                if answered == "response.done":
                    break
                if not str(answered).startswith("response."):
                    raise TargetError(f"unexpected event in answer: {event[:300]}")
    return (now - started) * 1000, received


async def measure_round_trips(
    targets: list[Target], count: int, warmup: int, size: int, compression: str | None, limit: float
) -> None:
    """Warm-up, then `count` round trips per target in alternating blocks, within `limit` s."""
    sessions: dict[str, ClientConnection] = {}
    try:
        for target in targets:
            try:
                sessions[target.name] = await open_session(target.url, compression)
            except TargetError as exc:
                target.error = str(exc)
                continue
            response = sessions[target.name].response
            assert response is not None
            target.extensions = response.headers.get("sec-websocket-extensions", "") or "none"
        live = [t for t in targets if t.name in sessions]
        pools = {k: iter(messages(k, (count + warmup) * len(live), size)) for k in KINDS}

        async def play(target: Target, kind: str, times: int, record: bool) -> None:
            ws = sessions[target.name]
            samples = target.samples.setdefault(kind, [])
            try:
                for _ in range(times):
                    ms, received = await round_trip(ws, kind, next(pools[kind]))
                    if record:
                        samples.append(ms)
                        target.bytes_down[kind] = received
            except TimeoutError:
                what = "its echo" if kind == ECHO else "response.done"
                target.error = f"{kind}: no {what} within {WAIT_S:.0f} s"
                live.remove(target)
            except (TargetError, ConnectionClosed) as exc:
                target.error = f"{kind}: the session broke: {exc}"
                live.remove(target)

        def short(target: Target, kind: str) -> int:
            return count - len(target.samples.get(kind, []))

        for target in list(live):
            for kind in KINDS:
                if target in live:
                    await play(target, kind, warmup, record=False)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and any(short(t, k) for t in live for k in KINDS):
            for kind in KINDS:
                for target in list(live):
                    await play(target, kind, min(BLOCK, short(target, kind)), record=True)
    finally:
        await asyncio.gather(*(ws.close() for ws in sessions.values()), return_exceptions=True)


@dataclass
class IdleResult:
    through: str  # the target the sessions were opened against
    sessions: int
    opened: int = 0
    open_seconds: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)
    rss: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # before, with, after
    fds: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # the same, descriptors


async def idle_sessions(
    through: Target,
    measured: list[Target],
    count: int,
    concurrency: int,
    compression: str | None,
    limit: float,
) -> IdleResult:
    """Open `count` sessions against `through`, read the RSS of `measured`, close them all."""
    result = IdleResult(through.name, count)
    with_pid = [t for t in measured if t.pid is not None]
    await asyncio.sleep(1)
    before = {t.name: rss_kib(t.pid) for t in with_pid if t.pid is not None}
    fds_before = {t.name: descriptors(t.pid) for t in with_pid if t.pid is not None}
    gate = asyncio.Semaphore(concurrency)
    opened: list[ClientConnection] = []

    async def one() -> None:
        async with gate:
            try:
                opened.append(await open_session(through.url, compression))
            except TargetError as exc:
                reason = str(exc)[:120]
                result.failures[reason] = result.failures.get(reason, 0) + 1

    started = time.monotonic()
    tasks = [asyncio.ensure_future(one()) for _ in range(count)]
    try:
        await asyncio.wait(tasks, timeout=limit)
        result.open_seconds = time.monotonic() - started
        pending = sum(not task.done() for task in tasks)
        if pending:
            result.failures[f"not open within --time-limit ({limit:.0f} s)"] = pending
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        result.opened = len(opened)
        await asyncio.sleep(1)
        with_sessions = {t.name: rss_kib(t.pid) for t in with_pid if t.pid is not None}
        fds_with = {t.name: descriptors(t.pid) for t in with_pid if t.pid is not None}
    finally:

        async def close(ws: ClientConnection) -> None:
            async with gate:
                await ws.close()

        await asyncio.gather(*(close(ws) for ws in opened), return_exceptions=True)
    await asyncio.sleep(1)
    for target in with_pid:
        assert target.pid is not None
        after = rss_kib(target.pid)
        result.rss[target.name] = (before[target.name], with_sessions[target.name], after)
        fds = fds_before[target.name], fds_with[target.name], descriptors(target.pid)
        result.fds[target.name] = fds
    return result


# ------------------------------------------------------------------------- report
def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def latency_table(targets: list[Target]) -> list[str]:
    rows = [
        "| round trip, ms | message, answer | p50 | p90 | p99 | max |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    stats: dict[tuple[str, str], list[float]] = {}
    for kind in KINDS:
        what = "fake.echo, its echo" if kind == ECHO else "response.create, response.done"
        for target in targets:
            samples = target.samples.get(kind, [])
            if not samples:
                why = "no samples" if target.error is None else "failed (see below)"
                rows.append(f"| {target.name} | {what} | {why} | | | |")
                continue
            values = [percentile(samples, f) for f in (0.5, 0.9, 0.99)] + [max(samples)]
            stats[target.name, kind] = values
            cells = " | ".join(f"{v:.3f}" for v in values)
            rows.append(f"| {target.name} ({len(samples):,}) | {what} | {cells} |")
        if ("direct", kind) in stats and ("llmproxy", kind) in stats:
            pairs = zip(stats["llmproxy", kind][:3], stats["direct", kind][:3], strict=True)
            cells = " | ".join(f"{p - d:+.3f}" for p, d in pairs)
            rows.append(f"| added by llmproxy | {what} | {cells} | – |")
    return rows


def rss_table(cycles: list[IdleResult], pids: dict[str, int | None]) -> list[str]:
    via = "through llmproxy" if cycles[0].through == "llmproxy" else "direct to the fake"
    rows = [
        f"| {cycles[0].sessions:,} idle sessions {via} | VmRSS before | with sessions "
        "| per session | after closing | descriptors before / with / after |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for number, idle in enumerate(cycles, 1):
        for name, (before, with_sessions, after) in idle.rss.items():
            per = (with_sessions - before) / idle.opened if idle.opened else float("nan")
            label = "fake upstream" if name == "direct" else name
            label += f" (pid {pids[name]})" if len(cycles) == 1 else f", cycle {number}"
            fds = " / ".join(f"{n:,}" for n in idle.fds[name])
            rows.append(
                f"| {label} | {before / 1024:,.1f} MiB | {with_sessions / 1024:,.1f} MiB "
                f"| {per:,.1f} KiB | {after / 1024:,.1f} MiB | {fds} |"
            )
    return rows


# ------------------------------------------------------------------------- main
def run_fast(coro: Coroutine[Any, Any, _T]) -> _T:
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@contextlib.contextmanager
def servers(args: argparse.Namespace, logdir: Path) -> Iterator[tuple[Target, Target | None]]:
    """The fake upstream and the proxy: the running ones given, or started here."""
    procs = Processes(logdir)
    try:
        if args.upstream_url:
            url = realtime_url(args.upstream_url)
            upstream = Target("direct", url, listening_pid(port_of(url)))
        else:
            port = free_port()
            argv = [sys.executable, "-m", "fake_upstream", "--host", "127.0.0.1"]
            proc = procs.start("fake-upstream", [*argv, "--port", str(port)], {})
            try:
                wait_listening(port, proc)
            except RuntimeError as exc:
                raise SystemExit(
                    f"fake-upstream: {exc}\n{procs.log_tail('fake-upstream')}"
                ) from None
            upstream = Target("direct", realtime_url(f"http://127.0.0.1:{port}"), proc.pid)
        proxy = None
        if args.proxy_url:
            url = realtime_url(args.proxy_url)
            proxy = Target("llmproxy", url, listening_pid(port_of(url)))
        elif not args.no_proxy:
            port = free_port()
            base = urlunsplit(("http", urlsplit(upstream.url).netloc, "/v1", "", ""))
            argv = [sys.executable, "-m", "llmproxy", "serve", "--host", "127.0.0.1"]
            argv += ["--port", str(port), "--log-level", "warning"]
            proc = procs.start("llmproxy", argv, {"LLMPROXY_UPSTREAM_URL": base})
            try:
                wait_listening(port, proc)
            except RuntimeError as exc:
                raise SystemExit(f"llmproxy: {exc}\n{procs.log_tail('llmproxy')}") from None
            proxy = Target("llmproxy", realtime_url(f"http://127.0.0.1:{port}"), proc.pid)
        yield upstream, proxy
    finally:
        procs.stop_all()


async def bench(args: argparse.Namespace, upstream: Target, proxy: Target | None) -> int:
    compression = None if args.no_compression else "deflate"
    targets = [upstream] if proxy is None else [upstream, proxy]
    await measure_round_trips(
        targets, args.round_trips, args.warmup, args.message_bytes, compression, args.time_limit
    )
    if upstream.error is not None:
        raise SystemExit(f"the fake upstream at {upstream.url}: {upstream.error}")
    through = proxy if proxy is not None and proxy.error is None else upstream
    measured = [proxy, upstream] if through is proxy and proxy is not None else [upstream]
    cycles = [
        await idle_sessions(
            through, measured, args.sessions, args.concurrency, compression, args.time_limit
        )
        for _ in range(args.cycles)
    ]

    print(
        f"\nWebSocket bench, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, nothing "
        f"pinned; one session per target, {args.warmup} warm-up round trips, then up to "
        f"{args.round_trips:,} of each kind in alternating blocks of {BLOCK}; every message "
        f"{args.message_bytes:,} bytes, the echo the same, response.create answered with "
        f"{upstream.bytes_down.get(RESPONSE, 0):,} bytes in three events\n"
    )
    print("\n".join(latency_table(targets)))
    print()
    pids = {t.name: t.pid for t in targets}
    print("\n".join(rss_table(cycles, pids)))
    print()
    for target in targets:
        where = f"pid {target.pid}" if target.pid is not None else "pid not found: no RSS"
        extensions = target.extensions or "–"
        print(f"* {target.name}: {target.url} ({where}); extensions: {extensions}")
    for number, idle in enumerate(cycles, 1):
        print(
            f"* {f'cycle {number}: ' if len(cycles) > 1 else ''}{idle.opened:,} of "
            f"{idle.sessions:,} sessions opened in {idle.open_seconds:.2f} s, at most "
            f"{args.concurrency} handshakes at once"
        )
        for reason, times in idle.failures.items():
            print(f"* {times:,} sessions failed: {reason}")
    if through is not proxy:
        print("* the sessions went directly to the fake upstream: the proxy was not measured")
    missing = [
        t.name
        for t in targets
        if t.error is None and any(len(t.samples.get(k, [])) < args.round_trips for k in KINDS)
    ]
    if missing:
        print(f"* --time-limit cut the round trips short for: {', '.join(missing)}")
    if proxy is not None and proxy.error is not None:
        print(f"* llmproxy at {proxy.url}: {proxy.error}")
        return 1
    return 1 if any(idle.failures for idle in cycles) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--round-trips", type=int, default=2000, help="per target (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="round trips first (default 200)")
    parser.add_argument("--sessions", type=int, default=1000, help="idle sessions (default 1000)")
    parser.add_argument(
        "--cycles", type=int, default=1, help="open-measure-close the sessions N times (1)"
    )
    parser.add_argument("--concurrency", type=int, default=50, help="handshakes at once (50)")
    parser.add_argument("--message-bytes", type=int, default=1024, help="default 1024")
    parser.add_argument(
        "--time-limit", type=float, default=120, help="seconds per phase at most (default 120)"
    )
    parser.add_argument("--no-compression", action="store_true", help="offer no permessage-deflate")
    parser.add_argument("--upstream-url", help="a running fake upstream (base URL, loopback)")
    parser.add_argument("--proxy-url", help="a running proxy in front of it (needs --upstream-url)")
    parser.add_argument("--no-proxy", action="store_true", help="the direct measurements only")
    parser.add_argument("--keep-logs", action="store_true", help="keep the started servers' logs")
    args = parser.parse_args(argv)
    if args.proxy_url and not args.upstream_url:
        parser.error("--proxy-url needs --upstream-url (the proxy's upstream, for comparison)")
    for name in ("round_trips", "sessions", "concurrency", "cycles"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for url in (args.upstream_url, args.proxy_url):
        if url:
            realtime_url(url)  # exits with the reason before anything starts
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:  # this process holds every session; started servers inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logdir = Path(tempfile.mkdtemp(prefix="llmproxy-websockets-bench-"))
    failed = True
    try:
        with servers(args, logdir) as (upstream, proxy):
            status = run_fast(bench(args, upstream, proxy))
        failed = status != 0
        return status
    finally:
        if (failed or args.keep_logs) and any(logdir.iterdir()):
            print(f"logs: {logdir}")
        else:
            shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
