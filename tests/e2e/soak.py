"""The soak test's machinery (issue 5, item 7): a seeded plan of streamed requests, an asyncio
client that plays it against the proxy with bounded concurrency and checks every answer, and
process-level observables (RSS, this process's TCP sockets).

A plan is a list of `Planned` requests, each of one of three kinds:

- `complete`: the stream runs to `[DONE]`;
- `disconnect`: the client closes the response after `k` content events while the upstream is
  still busy (stalled, or streaming slowly for seconds), so the proxy must notice the client
  leaving, close the upstream request and log `client_disconnect`;
- `reset`: the upstream sends `k` content events then a TCP reset; the client must get them,
  then the `upstream_stream_interrupted` error event, and no `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.e2e.sse_events import CHAT_PATH, chat_request, content_of, split_events

COMPLETE = "complete"
DISCONNECT = "disconnect"
RESET = "reset"
KINDS = (COMPLETE, DISCONNECT, RESET)

# How each kind must end in the proxy's access log.
EXPECTED_ENDING = {
    COMPLETE: "complete",
    DISCONNECT: "client_disconnect",
    RESET: "upstream_error",
}

INTERRUPTED = "upstream_stream_interrupted"
DEFAULT_CHUNKS = ["Hello", " from", " fake", " upstream", "!"]  # the fake's default reply

# A disconnect must find the upstream still busy, whatever the machine's load: either stalled
# (held until the proxy leaves) or streaming slowly for this long in all.
_SLOW_STREAM_SECONDS = 6.0
_SLOW_STREAM_CHUNKS = 120

_WORDS = ("alpha", " beta", " gamma", " delta", " ε", " 😀", " zeta", "\n", " eta", " θ")


@dataclass(frozen=True)
class Planned:
    """One request of the plan: how it is scripted and what the client must see."""

    request_id: str
    kind: str
    script: dict[str, Any]
    chunks: list[str]  # content events the upstream sends before its ending
    read_chunks: int  # content events the client reads (all for complete; k otherwise)

    @property
    def expected_content(self) -> str:
        return "".join(self.chunks[: self.read_chunks])


def make_plan(rng: random.Random, count: int, prefix: str) -> list[Planned]:
    """`count` requests of a seeded random mix of kinds, chunk counts and per-chunk delays."""
    return [_plan_one(rng, f"{prefix}-{index}") for index in range(count)]


def _plan_one(rng: random.Random, request_id: str) -> Planned:
    kind = rng.choices(KINDS, weights=(4, 3, 3))[0]
    script: dict[str, Any] = {"stream": True}
    if rng.random() < 0.5:
        chunks = list(DEFAULT_CHUNKS)
    else:
        chunks = [rng.choice(_WORDS) for _ in range(rng.randint(1, 12))]
        script["chunks"] = chunks
    if rng.random() < 0.3:
        script["delay_per_chunk"] = round(rng.uniform(0.001, 0.02), 4)
    if kind == COMPLETE:
        return Planned(request_id, kind, script, chunks, len(chunks))
    if kind == RESET:
        k = rng.randint(0, len(chunks))
        script.update(ending="reset", after_chunks=k)
        return Planned(request_id, kind, script, chunks, k)
    k = rng.randint(0, min(3, len(chunks)))
    if rng.random() < 0.7:
        # The upstream sends a few more events than the client reads, then holds the stream.
        script.update(ending="stall", after_chunks=min(len(chunks), k + rng.randint(0, 2)))
    else:
        # The upstream is still writing when the client leaves.
        chunks = [f"t{n} " for n in range(_SLOW_STREAM_CHUNKS)]
        script["chunks"] = chunks
        script["delay_per_chunk"] = _SLOW_STREAM_SECONDS / _SLOW_STREAM_CHUNKS
    return Planned(request_id, kind, script, chunks, k)


@dataclass
class Outcome:
    """What the client saw of one planned request; `problems` empty when all was as planned."""

    planned: Planned
    status: int | None = None
    payloads: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def run_plan(proxy_url: str, plan: list[Planned], concurrency: int) -> list[Outcome]:
    """Play `plan` against the proxy, at most `concurrency` requests at a time."""
    # Idle connections are dropped well before uvicorn's 5 s keep-alive: reusing one the proxy
    # is closing at that moment fails the request in the client, through no fault of the proxy.
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0
    )
    timeout = httpx.Timeout(30.0, pool=60.0)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=proxy_url, limits=limits, timeout=timeout) as client:

        async def bounded(planned: Planned) -> Outcome:
            async with semaphore:
                return await _run_one(client, planned)

        return await asyncio.gather(*(bounded(planned) for planned in plan))


async def _run_one(client: httpx.AsyncClient, planned: Planned) -> Outcome:
    outcome = Outcome(planned)
    headers = {"x-request-id": planned.request_id, "x-fake-script": json.dumps(planned.script)}
    try:
        async with client.stream(
            "POST", CHAT_PATH, json=chat_request(), headers=headers
        ) as response:
            outcome.status = response.status_code
            echoed = response.headers.get("x-llmproxy-request-id")
            if echoed != planned.request_id:
                outcome.problems.append(f"x-llmproxy-request-id {echoed!r}")
            if response.status_code != 200:
                outcome.problems.append(f"status {response.status_code}")
                return outcome
            if planned.kind == DISCONNECT:
                # Leaving the block with the body half read closes the connection.
                await _read_until(response, outcome, 1 + planned.read_chunks)
            else:
                await _read_until(response, outcome, None)
    except httpx.HTTPError as error:
        outcome.problems.append(f"{type(error).__name__}: {error}")
        return outcome
    _check(outcome)
    if not outcome.problems:
        outcome.payloads = []  # kept only to explain a failure: thousands would weigh on RSS
    return outcome


async def _read_until(response: httpx.Response, outcome: Outcome, events: int | None) -> None:
    """Collect `data:` payloads until `events` of them (None: to the end of the body)."""
    pending = b""
    async for data in response.aiter_raw():
        pending += data
        complete = split_events(pending)
        pending = pending[sum(len(raw) for raw in complete) :]
        for raw in complete:
            payload = _data_of(raw)
            if payload:
                outcome.payloads.append(payload)
            if events is not None and len(outcome.payloads) >= events:
                return
    if pending:
        outcome.problems.append(f"body ended inside an event: {pending[:80]!r}")


def _data_of(raw: bytes) -> str:
    lines = re.split(rb"\r\n|\n|\r", raw)
    return "\n".join(
        line[5:].removeprefix(b" ").decode() for line in lines if line.startswith(b"data:")
    )


def _check(outcome: Outcome) -> None:
    planned, payloads = outcome.planned, outcome.payloads
    if planned.kind == DISCONNECT:
        expected_events = 1 + planned.read_chunks  # the role delta first
        if len(payloads) != expected_events:
            outcome.problems.append(f"{len(payloads)} events before leaving, not {expected_events}")
        elif content_of(payloads) != planned.expected_content:
            outcome.problems.append(f"content {content_of(payloads)!r}")
        return
    if planned.kind == COMPLETE:
        if not payloads or payloads[-1] != "[DONE]":
            outcome.problems.append(f"no [DONE] at the end: {payloads[-2:]}")
        elif content_of(payloads) != planned.expected_content:
            outcome.problems.append(f"content {content_of(payloads)!r}")
        return
    # RESET: k content events, then the interruption event, and never [DONE].
    if "[DONE]" in payloads:
        outcome.problems.append("[DONE] on a reset stream")
        return
    if not payloads:
        outcome.problems.append("no events at all")
        return
    try:
        code = json.loads(payloads[-1])["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    if code != INTERRUPTED:
        outcome.problems.append(f"last event is not the interruption: {payloads[-1][:120]!r}")
    elif content_of(payloads[:-1]) != planned.expected_content:
        outcome.problems.append(f"content before the reset {content_of(payloads[:-1])!r}")


# --- process observables ------------------------------------------------------------------


def rss_bytes() -> int:
    """This process's resident set size (VmRSS of /proc/self/status)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


_ESTABLISHED = "01"


def established_sockets(*, local_port: int | None = None, remote_port: int | None = None) -> int:
    """ESTABLISHED TCP sockets of this process (not the machine's) with these ports."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed since listing
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)  # the header
                for line in lines:
                    fields = line.split()
                    local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                    if state != _ESTABLISHED or inode not in inodes:
                        continue
                    if local_port is not None and int(local.rsplit(":", 1)[1], 16) != local_port:
                        continue
                    if remote_port is not None and int(remote.rsplit(":", 1)[1], 16) != remote_port:
                        continue
                    count += 1
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
    return count


class ProxyTracebacks(logging.Handler):
    """Keeps, as text, the records whose traceback passes through the package in `package_dir`.

    Only text is kept: a record's traceback holds every frame's locals, and holding thousands
    (the fake upstream's own errors pass here too) would show up as RSS growth.
    """

    def __init__(self, package_dir: str) -> None:
        super().__init__(level=logging.ERROR)
        self._package_dir = package_dir
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[2] is not None:
            frames = traceback.extract_tb(record.exc_info[2])
            if any(os.path.dirname(frame.filename) == self._package_dir for frame in frames):
                self.found.append(f"{record.getMessage().strip()} {record.exc_info[1]!r}")

    @contextlib.contextmanager
    def watching(self, logger: logging.Logger) -> Iterator[ProxyTracebacks]:
        """This handler on `logger` for the block."""
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)


def wait_until(condition: Callable[[], bool], timeout: float, describe: Callable[[], str]) -> None:
    """Poll `condition` until it holds; fail with `describe()` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {describe()}")
        time.sleep(0.02)
