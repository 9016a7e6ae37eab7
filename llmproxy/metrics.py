"""Prometheus metrics (issue 5): what `/metrics` reports, fed from each request's record.

With `--workers N`, `llmproxy serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory before
the workers start, so every process writes its samples there and `/metrics` (answered by any one
worker) adds them all up. Labels hold statuses only: nothing a client sent, nothing secret.
"""

from __future__ import annotations

import bisect
import functools
import os
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from llmproxy.access_log import (
    CLIENT_DISCONNECT,
    NOT_REPORTED,
    RequestRecord,
    SessionRecord,
)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds: from sub-millisecond proxy work to minutes-long generations.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# The per-request path counts into prometheus_client's value objects directly: its public
# inc()/observe() check on every call that the metric is not a labelled parent, the amount and
# exemplars, and Histogram.observe scans the bounds in a Python loop (observe() took ~3 µs of a
# forwarded request's ~90 that way, ~2 µs this way). The value objects are what every sample is
# read from, and what PROMETHEUS_MULTIPROC_DIR swaps (at import) for ones in a shared file, so
# the counts and /metrics are the same in both modes. tests/unit/test_metrics_fast_path.py names
# any of these private attributes a prometheus_client release drops, and holds the two paths'
# pages equal.


def _value_of(metric: Counter | Gauge) -> Any:
    """The value object an unlabelled metric or a labelled child counts into."""
    return metric._value


def _observer(histogram: Histogram) -> Callable[[float], None]:
    """`histogram.observe` without the per-call checks. For durations only: a NaN would land in
    the first bucket here, in none through the public observe()."""
    total, buckets, bounds = histogram._sum, histogram._buckets, histogram._upper_bounds

    def observe(amount: float) -> None:
        total.inc(amount)
        # Each bucket counts the amounts above the bound before it, up to and including its own
        # (the last bound is +Inf); the exposition adds them up into the cumulative `le` ones.
        buckets[bisect.bisect_left(bounds, amount)].inc(1)

    return observe


class _UnlabelledGauge(Gauge):
    """A Gauge without labels, whose inc() and dec() skip the check, made on every call, that
    they are not called on a labelled parent."""

    def inc(self, amount: float = 1) -> None:
        self._value.inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._value.inc(-amount)


REQUESTS = Counter(
    "llmproxy_requests_total",
    "Requests answered, by access key name and the status sent to the client",
    ["key", "status"],
)
TOKENS = Counter(
    "llmproxy_tokens_total",
    "Tokens the answers reported, by access key name, the model the answer names, and kind "
    "(input, output, cached_input, reasoning)",
    ["key", "model", "kind"],
)
LIMITER_ERRORS = Counter(
    "llmproxy_limiter_errors_total",
    "Calls to the rate limiter's Redis that failed or timed out (redis_timeout)",
)
USAGE_UNKNOWN = Counter(
    "llmproxy_usage_unknown_total",
    "Answers that should have reported token usage and did not, by key and why "
    "(not_reported, client_disconnect, upstream_error)",
    ["key", "reason"],
)
UPSTREAM_HEADERS = Histogram(
    "llmproxy_upstream_headers_seconds",
    "Time from the request's arrival to the upstream's response headers",
    buckets=_LATENCY_BUCKETS,
)
FIRST_BYTE = Histogram(
    "llmproxy_first_byte_seconds",
    "Time from the request's arrival to the first body byte sent to the client",
    buckets=_LATENCY_BUCKETS,
)
ACTIVE_STREAMS = _UnlabelledGauge(
    "llmproxy_active_streams",
    "Responses being relayed right now",
    multiprocess_mode="livesum",
)
CLIENT_DISCONNECTS = Counter(
    "llmproxy_client_disconnects_total", "Requests whose client left before the answer ended"
)
RETRIES = Counter("llmproxy_retries_total", "Upstream attempts beyond the first")
CLIENT_TIMEOUTS = Counter(
    "llmproxy_client_timeouts_total",
    "Client connections closed by client_header_timeout or client_body_timeout",
    ["phase"],  # header or body
)

WEBSOCKET_SESSIONS_ACTIVE = _UnlabelledGauge(
    "llmproxy_websocket_sessions_active",
    "WebSocket sessions open right now (upgraded on both sides)",
    multiprocess_mode="livesum",
)
WEBSOCKET_SESSIONS = Counter(
    "llmproxy_websocket_sessions_total",
    "WebSocket sessions that were opened and have ended, by the close code the client's side "
    "ended with (1006: its connection was lost without a close frame)",
    ["close_code"],
)
_WEBSOCKET_MESSAGES = Counter(
    "llmproxy_websocket_messages_total",
    "WebSocket messages relayed (close frames are not messages)",
    ["direction"],
)
_WEBSOCKET_BYTES = Counter(
    "llmproxy_websocket_bytes_total",
    "Payload bytes of the WebSocket messages relayed (text as UTF-8)",
    ["direction"],
)
# Children looked up once: counted per message.
WEBSOCKET_MESSAGES_TO_UPSTREAM = _WEBSOCKET_MESSAGES.labels("client_to_upstream")
WEBSOCKET_MESSAGES_TO_CLIENT = _WEBSOCKET_MESSAGES.labels("upstream_to_client")
WEBSOCKET_BYTES_TO_UPSTREAM = _WEBSOCKET_BYTES.labels("client_to_upstream")
WEBSOCKET_BYTES_TO_CLIENT = _WEBSOCKET_BYTES.labels("upstream_to_client")


_observe_upstream_headers = _observer(UPSTREAM_HEADERS)
_observe_first_byte = _observer(FIRST_BYTE)


@functools.lru_cache(maxsize=4096)
def _requests_with(key: str, status: int) -> Any:
    return _value_of(REQUESTS.labels(key, str(status)))  # the labelled child's, looked up once


@functools.lru_cache(maxsize=4096)
def _tokens_of(key: str, model: str) -> tuple[Any, Any, Any, Any]:
    return (
        _value_of(TOKENS.labels(key, model, "input")),
        _value_of(TOKENS.labels(key, model, "output")),
        _value_of(TOKENS.labels(key, model, "cached_input")),
        _value_of(TOKENS.labels(key, model, "reasoning")),
    )


def observe(record: RequestRecord) -> None:
    """Count one finished request."""
    _requests_with(record.key, record.status or 0).inc(1)
    _count_usage(record)
    if record.upstream_headers_ms is not None:
        _observe_upstream_headers(record.upstream_headers_ms / 1000)
    if record.first_byte_ms is not None:
        _observe_first_byte(record.first_byte_ms / 1000)
    if record.ending == CLIENT_DISCONNECT:
        CLIENT_DISCONNECTS.inc()
    if record.attempts > 1:
        RETRIES.inc(record.attempts - 1)


def _count_usage(record: RequestRecord | SessionRecord) -> None:
    tokens = record.tokens
    if tokens is not None:
        model, inputs, outputs, cached, reasoning = tokens
        to_inputs, to_outputs, to_cached, to_reasoning = _tokens_of(record.key, model or "unknown")
        # Each increment takes a lock; cached and reasoning are mostly 0. No count is negative
        # (usage.py reads only ints >= 0): Counter.inc would refuse one, these would not.
        if inputs:
            to_inputs.inc(inputs)
        if outputs:
            to_outputs.inc(outputs)
        if cached:
            to_cached.inc(cached)
        if reasoning:
            to_reasoning.inc(reasoning)
    elif record.usage is not None:
        USAGE_UNKNOWN.labels(record.key, record.usage_unknown_reason or NOT_REPORTED).inc()


def observe_session(record: SessionRecord) -> None:
    """Count one finished WebSocket session (its messages were counted as they passed)."""
    _requests_with(record.key, record.status or 0).inc(1)
    if record.status == 101:
        WEBSOCKET_SESSIONS.labels(str(record.client_close_code or 0)).inc()
    _count_usage(record)


def exposition() -> tuple[bytes, str]:
    """The metrics page and its content type, summed over the worker processes if several."""
    if os.environ.get(MULTIPROCESS_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
