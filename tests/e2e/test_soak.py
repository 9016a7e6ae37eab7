"""Soak (issue 5, item 7): many streams with random client disconnects and upstream resets,
then nothing left behind: no upstream connection open or in use, every request logged exactly
once with how it ended, and RSS growth bounded.

`LLMPROXY_SOAK_STREAMS` sets the number of streams (default 300, a few seconds; `nox -s soak`
runs 2000), `LLMPROXY_SOAK_SEED` the seed of the mix (printed, to replay a failure).

The proxy runs in front of a fake upstream of its own, so every socket to that fake's port in
this process belongs either to the proxy's upstream pool or to the fake's side of it.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import random
import time
import uuid
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import llmproxy
from fake_upstream.server import FakeUpstreamServer
from llmproxy.forwarder import Forwarder
from tests.e2e.conftest import Target, start_proxy
from tests.e2e.soak import (
    COMPLETE,
    DISCONNECT,
    EXPECTED_ENDING,
    RESET,
    Outcome,
    Planned,
    ProxyTracebacks,
    established_sockets,
    make_plan,
    rss_bytes,
    run_plan,
    wait_until,
)

STREAMS = int(os.environ.get("LLMPROXY_SOAK_STREAMS", "300"))
# pytest-timeout's default (120 s) fits the default count; `nox -s soak` runs far more.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120 + STREAMS // 10)]
SEED = int(os.environ.get("LLMPROXY_SOAK_SEED", "20240501"))
CONCURRENCY = 50
WARMUP_STREAMS = 100  # before the first RSS reading: pools, caches and code paths warmed
# Generous: the fake's journal and the captured log records of this very process grow with the
# number of streams (a few KB each); a per-request leak in the proxy would exceed this.
RSS_GROWTH_BOUND = 60 * 2**20 + STREAMS * 8 * 2**10
SETTLE_DEADLINE = 15.0  # after the last client is done, for everything else to settle
PROXY_PACKAGE = os.path.dirname(os.path.abspath(llmproxy.__file__))


def metric_samples(proxy_url: str) -> dict[str, float]:
    """The proxy's unlabelled samples, and `llmproxy_requests_total{status=...}` summed over
    its keys as `..._200`."""
    page = httpx.get(f"{proxy_url}/metrics", timeout=10).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            labels = dict(sample.labels)
            if sample.name == "llmproxy_requests_total":
                labels.pop("key", None)
            suffix = "".join(f"_{value}" for value in labels.values())
            found[sample.name + suffix] = found.get(sample.name + suffix, 0.0) + sample.value
    return found


def pool_of(forwarder: Forwarder) -> tuple[int, int]:
    """(connections in use, idle connections still connected) of the proxy's upstream pool.

    Read from this thread while the proxy's loop runs: the counts copy the pool's containers
    first (`list()` of a built-in container is atomic under the GIL).
    """
    return forwarder.upstream_client.pool_counts()


def request_id_of(entry: dict[str, object]) -> str | None:
    headers = entry["headers"]
    assert isinstance(headers, list)
    return next((value for name, value in headers if name == "x-request-id"), None)


def test_soak_streams_with_disconnects_and_resets_leave_nothing_behind(
    self_hosted: Target, caplog: pytest.LogCaptureFixture
) -> None:
    print(f"soak: LLMPROXY_SOAK_SEED={SEED} LLMPROXY_SOAK_STREAMS={STREAMS}")
    rng = random.Random(SEED)  # noqa: S311 - a reproducible mix, not cryptography
    run = uuid.uuid4().hex[:8]  # request ids unique across repeated runs in one session
    warmup = make_plan(rng, WARMUP_STREAMS, f"soak-{run}-w")
    plan = make_plan(rng, STREAMS, f"soak-{run}")
    planned = {p.request_id: p for p in [*warmup, *plan]}
    assert len(planned) <= 10_000, "the fake's journal keeps the last 10 000 requests"

    caplog.set_level(logging.INFO, logger="llmproxy.access")
    with (
        FakeUpstreamServer() as fake,
        start_proxy(fake.base_url, read_timeout=60.0) as proxy,
        # uvicorn's own logging config stops its records at the "uvicorn" logger, so tracebacks
        # of the proxy's server ("Exception in ASGI application") are watched for there.
        ProxyTracebacks(PROXY_PACKAGE).watching(logging.getLogger("uvicorn.error")) as crashes,
    ):
        fake_port = int(fake.url.rsplit(":", 1)[1])
        forwarder = proxy.app.forwarder
        assert forwarder is not None
        before = metric_samples(proxy.url)

        outcomes = asyncio.run(run_plan(proxy.url, warmup, CONCURRENCY))
        gc.collect()
        rss_before = rss_bytes()
        started = time.monotonic()
        outcomes += asyncio.run(run_plan(proxy.url, plan, CONCURRENCY))
        duration = time.monotonic() - started
        gc.collect()
        rss_after = rss_bytes()

        # What each client saw.
        failed = [o for o in outcomes if o.problems]
        assert not failed, describe_failures(failed, fake.journal(), caplog.records)

        # The fake saw every request once, and none of them is still running.
        def journal_settled() -> bool:
            journal = fake.journal()
            return len(journal) == len(planned) and all(
                entry["completed"] or entry["disconnected"] for entry in journal
            )

        def journal_state() -> str:
            journal = fake.journal()
            running = [
                request_id_of(e) for e in journal if not (e["completed"] or e["disconnected"])
            ]
            return f"{len(journal)} of {len(planned)} journaled; still running: {running[:10]}"

        wait_until(journal_settled, SETTLE_DEADLINE, journal_state)
        journal = fake.journal()
        journaled = collections.Counter(request_id_of(entry) for entry in journal)
        assert journaled == dict.fromkeys(planned, 1), "journal ids differ from the plan"
        wrong_state = [
            (request_id_of(e), e["completed"], e["disconnected"])
            for e in journal
            if not upstream_state_fits(planned[str(request_id_of(e))], e)
        ]
        assert not wrong_state, f"journal states (id, completed, disconnected): {wrong_state[:10]}"

        # No request, stream or upstream connection is left in use by the proxy, and every
        # upstream socket this process still has open is an idle connection of its pool.
        def proxy_idle() -> bool:
            in_use, idle = pool_of(forwarder)
            return (
                forwarder.active_requests == 0
                and in_use == 0
                and established_sockets(remote_port=fake_port) == idle
                and metric_samples(proxy.url)["llmproxy_active_streams"] == 0
            )

        def proxy_state() -> str:
            in_use, idle = pool_of(forwarder)
            return (
                f"active_requests={forwarder.active_requests} pool in use={in_use} idle={idle}"
                f" sockets to the fake={established_sockets(remote_port=fake_port)}"
                f" active_streams={metric_samples(proxy.url)['llmproxy_active_streams']}"
            )

        wait_until(proxy_idle, SETTLE_DEADLINE, proxy_state)
        after = metric_samples(proxy.url)
        kinds = collections.Counter(p.kind for p in planned.values())
        assert delta(after, before, "llmproxy_requests_total_200") == len(planned)
        assert delta(after, before, "llmproxy_client_disconnects_total") == kinds[DISCONNECT]

    # The proxy has stopped and closed its pool: no socket of this process to the fake's port
    # is left, on either side.
    wait_until(
        lambda: established_sockets(remote_port=fake_port) == 0,
        SETTLE_DEADLINE,
        lambda: f"{established_sockets(remote_port=fake_port)} upstream sockets still open",
    )
    wait_until(
        lambda: established_sockets(local_port=fake_port) == 0,
        SETTLE_DEADLINE,
        lambda: f"the fake still holds {established_sockets(local_port=fake_port)} sockets",
    )

    # Every request logged exactly once (the server has stopped: no line can still come), with
    # how it ended.
    lines = [r.getMessage() for r in caplog.records if r.name == "llmproxy.access"]
    by_id: dict[str, list[str]] = collections.defaultdict(list)
    for line in lines:
        by_id[line.split(" ", 1)[0]].append(line)
    not_once = {i: len(by_id.get(i, [])) for i in planned if len(by_id.get(i, [])) != 1}
    assert not not_once, (
        f"requests not logged exactly once (id: lines): {list(not_once.items())[:10]}"
    )
    strangers = set(by_id) - set(planned)
    assert not strangers, f"log lines of requests never sent: {sorted(strangers)[:10]}"
    wrong_lines = [
        (by_id[i][0], EXPECTED_ENDING[p.kind])
        for i, p in planned.items()
        if f" ending={EXPECTED_ENDING[p.kind]} " not in by_id[i][0]
        or " 200 upstream=200 attempts=1 " not in by_id[i][0]
    ]
    assert not wrong_lines, f"log lines (line, expected ending): {wrong_lines[:10]}"

    # Nothing went wrong inside the proxy on the way: no warning of its own, no traceback
    # through its code.
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("llmproxy") and r.levelno >= logging.WARNING
    ]
    assert not warnings, f"{len(warnings)} warnings from the proxy: {warnings[:5]}"
    assert not crashes.found, f"{len(crashes.found)} errors in the proxy: {crashes.found[:5]}"

    growth = rss_after - rss_before
    print(
        f"soak: {len(planned)} streams ({WARMUP_STREAMS} warm-up),"
        f" {kinds[COMPLETE]} complete, {kinds[DISCONNECT]} client disconnects,"
        f" {kinds[RESET]} upstream resets; {STREAMS} in {duration:.1f} s at {CONCURRENCY} at a"
        f" time; RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB"
        f" ({growth / 2**20:+.1f} MiB); seed {SEED}"
    )
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB"


def upstream_state_fits(planned: Planned, entry: dict[str, object]) -> bool:
    """Complete and reset streams ran their script to its end (a scripted reset counts); a
    client's disconnect reached the upstream as the proxy closing its request."""
    if planned.kind == DISCONNECT:
        return bool(entry["disconnected"]) and not entry["completed"]
    return bool(entry["completed"]) and not entry["disconnected"]


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def describe_failures(
    failed: list[Outcome], journal: list[dict[str, Any]], records: list[logging.LogRecord]
) -> str:
    """The failed requests, each with its journal entry and access-log line so far."""
    by_kind = collections.Counter(o.planned.kind for o in failed)
    lines = []
    for outcome in failed[:10]:
        planned = outcome.planned
        entries = [
            {key: e[key] for key in ("status", "completed", "disconnected")}
            | {"chunks": len(e["chunks"])}
            for e in journal
            if request_id_of(e) == planned.request_id
        ]
        logged = [
            r.getMessage()
            for r in records
            if r.name == "llmproxy.access" and r.getMessage().startswith(planned.request_id + " ")
        ]
        lines.append(
            f"  {planned.request_id} {planned.kind} {planned.script}: {outcome.problems}"
            f"\n    client got status {outcome.status}, events {outcome.payloads[-3:]}"
            f"\n    upstream journal {entries}\n    access log {logged}"
        )
    shown = "\n".join(lines)
    return f"{len(failed)} requests failed ({dict(by_kind)}), e.g.:\n{shown}"
