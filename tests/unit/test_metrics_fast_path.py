"""The per-request metrics path that counts into prometheus_client's value objects directly: the
private attributes it relies on, and the same /metrics page as the public API, in one process and
summed over several (PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as generate_latest_untyped
from prometheus_client.utils import floatToGoString

from llmproxy import metrics
from llmproxy.access_log import CLIENT_DISCONNECT, RequestRecord, SessionRecord
from llmproxy.usage import Usage, record_usage
from tests.support import llmproxy_environment

PROMETHEUS_CLIENT = importlib.metadata.version("prometheus_client")
BOUNDS = [float(bound) for bound in metrics._LATENCY_BUCKETS]
# On, just below and just above every bucket bound (+Inf too): where a wrong bucket shows.
AMOUNTS = [
    *(
        math.nextafter(bound, direction)
        for bound in [*BOUNDS, math.inf]
        for direction in (-math.inf, math.inf)
    ),
    *BOUNDS,
    math.inf,
    0.0,
    -1.0,
]
COUNTS = [1, 1, 10, 2.5, 0]


def generate_latest(registry: CollectorRegistry) -> str:
    return generate_latest_untyped(registry).decode()


def without_created(page: str) -> str:
    """The page without its `_created` series (the time each metric was made differs)."""
    return "\n".join(line for line in page.splitlines() if "_created" not in line)


def feed(prefix: str, *, fast: bool, registry: CollectorRegistry | None) -> None:
    """A counter, a gauge and a histogram named `prefix`_..., given the same observations through
    llmproxy.metrics' fast path or through prometheus_client's public API."""
    counter = Counter(f"{prefix}_requests", "Requests", ["key", "status"], registry=registry)
    plain = Counter(f"{prefix}_retries", "Retries", registry=registry)
    gauge_class = metrics._UnlabelledGauge if fast else Gauge
    gauge = gauge_class(
        f"{prefix}_streams", "Streams", multiprocess_mode="livesum", registry=registry
    )
    histogram = Histogram(
        f"{prefix}_seconds", "Latency", buckets=metrics._LATENCY_BUCKETS, registry=registry
    )
    child = counter.labels("-", "200")
    if fast:
        count_child, count_plain = metrics._value_of(child).inc, metrics._value_of(plain).inc
        observe = metrics._observer(histogram)
    else:
        count_child, count_plain, observe = child.inc, plain.inc, histogram.observe
    for amount in COUNTS:
        count_child(amount)
        count_plain(amount)
    for amount in AMOUNTS:
        observe(amount)
    gauge.inc()
    gauge.inc(3)
    gauge.dec()
    gauge.dec(0.5)


# --- the prometheus_client internals llmproxy.metrics uses ------------------------------------


def made(kind: str) -> Any:
    registry = CollectorRegistry()
    if kind == "Histogram":
        return Histogram("h", "h", buckets=metrics._LATENCY_BUCKETS, registry=registry)
    return {"Counter": Counter, "Gauge": Gauge}[kind]("m", "m", registry=registry)


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("Counter", "_value"),
        ("Gauge", "_value"),
        ("Histogram", "_sum"),
        ("Histogram", "_buckets"),
        ("Histogram", "_upper_bounds"),
    ],
)
def test_prometheus_client_still_has_the_attribute_the_fast_path_counts_into(
    kind: str, name: str
) -> None:
    assert hasattr(made(kind), name), (
        f"prometheus_client {PROMETHEUS_CLIENT}: {kind}.{name} is gone; llmproxy.metrics "
        "counts into it directly (its fast path)"
    )


def test_prometheus_client_values_still_count_with_inc() -> None:
    histogram = made("Histogram")
    values = [made("Counter")._value, made("Gauge")._value, histogram._sum, *histogram._buckets]
    lacking = [
        type(value).__name__ for value in values if not callable(getattr(value, "inc", None))
    ]
    assert not lacking, f"prometheus_client {PROMETHEUS_CLIENT}: {lacking} have no inc(amount)"


def test_prometheus_client_histogram_keeps_one_bucket_per_bound_ending_at_inf() -> None:
    histogram = made("Histogram")
    assert histogram._upper_bounds == [*BOUNDS, math.inf], (
        f"prometheus_client {PROMETHEUS_CLIENT}: Histogram._upper_bounds is no longer the "
        "sorted bounds plus +Inf that llmproxy.metrics' fast path bisects"
    )
    assert len(histogram._buckets) == len(histogram._upper_bounds), (
        f"prometheus_client {PROMETHEUS_CLIENT}: Histogram._buckets no longer holds one value "
        "per bound"
    )


# --- the same page as the public API ----------------------------------------------------------


def test_fast_path_gives_the_public_api_s_page_on_and_around_every_bound() -> None:
    public, fast = CollectorRegistry(), CollectorRegistry()
    feed("m", fast=False, registry=public)
    feed("m", fast=True, registry=fast)
    page = without_created(generate_latest(public))
    assert 'm_seconds_bucket{le="+Inf"} ' in page  # the comparison holds what it should
    assert without_created(generate_latest(fast)) == page


@given(st.lists(st.floats(allow_nan=False), max_size=50))
def test_fast_histogram_observes_any_durations_as_the_public_one_does(
    amounts: list[float],
) -> None:
    public, fast = CollectorRegistry(), CollectorRegistry()
    for registry, observe in (
        (public, lambda h: h.observe),
        (fast, metrics._observer),
    ):
        histogram = Histogram("h", "h", buckets=metrics._LATENCY_BUCKETS, registry=registry)
        observe_one = observe(histogram)
        for amount in amounts:
            observe_one(amount)
    assert without_created(generate_latest(fast)) == without_created(generate_latest(public))


def samples() -> dict[tuple[str, str], float]:
    """Every llmproxy sample in this process, by name and labels (the `_created` ones left out)."""
    return {
        (sample.name, json.dumps(sample.labels, sort_keys=True)): sample.value
        for family in REGISTRY.collect()
        if family.name.startswith("llmproxy_")
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def changes(before: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    after = samples()
    moved = {sample: value - before.get(sample, 0.0) for sample, value in after.items()}
    return {sample: change for sample, change in moved.items() if change}


def labels(**names: str) -> str:
    return json.dumps(names, sort_keys=True)


def latency(name: str, seconds: float) -> Iterator[tuple[tuple[str, str], float]]:
    """What observing `seconds` once adds to the histogram `name`."""
    for bound in [*BOUNDS, math.inf]:
        if seconds <= bound:
            yield (f"{name}_bucket", labels(le=floatToGoString(bound))), 1.0
    yield (f"{name}_count", labels()), 1.0
    yield (f"{name}_sum", labels()), seconds


def test_observe_counts_a_request_s_status_tokens_and_latencies() -> None:
    record = RequestRecord("POST", "/v1/chat/completions", key="fast-path-observe", status=200)
    record.upstream_headers_ms, record.first_byte_ms, record.attempts = 5.0, 250.0, 3
    record.ending = CLIENT_DISCONNECT
    record_usage(record, Usage("gpt-4o-mini", 10, 20, 0, 7))
    before = samples()
    metrics.observe(record)
    token = "llmproxy_tokens_total"
    tokens = {"key": "fast-path-observe", "model": "gpt-4o-mini"}
    assert changes(before) == pytest.approx(
        {
            ("llmproxy_requests_total", labels(key="fast-path-observe", status="200")): 1.0,
            (token, labels(**tokens, kind="input")): 10.0,
            (token, labels(**tokens, kind="output")): 20.0,
            (token, labels(**tokens, kind="reasoning")): 7.0,
            # A bound's own bucket takes a value on it: 5 ms is le="0.005", 250 ms le="0.25".
            **dict(latency("llmproxy_upstream_headers_seconds", 0.005)),
            **dict(latency("llmproxy_first_byte_seconds", 0.25)),
            ("llmproxy_client_disconnects_total", labels()): 1.0,
            ("llmproxy_retries_total", labels()): 2.0,
        }
    )
    assert samples()[(token, labels(**tokens, kind="cached_input"))] == 0.0  # shown, as before


def test_observe_session_counts_its_status_and_tokens() -> None:
    record = SessionRecord("/v1/realtime", key="fast-path-session", status=101)
    record.client_close_code = 1000
    record_usage(record, Usage(None, 3, 4, 2, 0))
    before = samples()
    metrics.observe_session(record)
    tokens = {"key": "fast-path-session", "model": "unknown"}
    assert changes(before) == {
        ("llmproxy_requests_total", labels(key="fast-path-session", status="101")): 1.0,
        ("llmproxy_websocket_sessions_total", labels(close_code="1000")): 1.0,
        ("llmproxy_tokens_total", labels(**tokens, kind="input")): 3.0,
        ("llmproxy_tokens_total", labels(**tokens, kind="output")): 4.0,
        ("llmproxy_tokens_total", labels(**tokens, kind="cached_input")): 2.0,
    }


@pytest.mark.parametrize("gauge", [metrics.ACTIVE_STREAMS, metrics.WEBSOCKET_SESSIONS_ACTIVE])
def test_the_per_request_gauges_go_up_and_down(gauge: Gauge) -> None:
    sample = (gauge._name, labels())
    before = samples()[sample]
    gauge.inc()
    gauge.inc()
    assert samples()[sample] == before + 2
    gauge.dec()
    gauge.dec()
    assert samples()[sample] == before


# --- summed over the worker processes ---------------------------------------------------------

# Run where PROMETHEUS_MULTIPROC_DIR was set before prometheus_client was imported, as in each of
# `llmproxy serve --workers N`'s workers, so the values are the ones in the shared files.
MULTIPROCESS_PROGRAM = """
from llmproxy import metrics
from llmproxy.access_log import RequestRecord
from llmproxy.usage import Usage, record_usage
from tests.unit.test_metrics_fast_path import feed

feed("public", fast=False, registry=None)
feed("fast", fast=True, registry=None)
record = RequestRecord("POST", "/v1/responses", key="worker", status=200)
record.upstream_headers_ms, record.first_byte_ms = 5.0, 250.0
record_usage(record, Usage("gpt-4o", 10, 20, 0, 0))
metrics.observe(record)
metrics.observe(record)
metrics.ACTIVE_STREAMS.inc()
metrics.ACTIVE_STREAMS.inc()
metrics.ACTIVE_STREAMS.dec()
print(metrics.exposition()[0].decode())
"""


def test_fast_path_counts_reach_the_multiprocess_page(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_PROGRAM],
        env=llmproxy_environment(PROMETHEUS_MULTIPROC_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).parents[2],  # where `tests` imports from
    )
    assert list(tmp_path.glob("*.db")), "no value was written to PROMETHEUS_MULTIPROC_DIR"
    lines = done.stdout.splitlines()

    def family(prefix: str) -> list[str]:
        return sorted(
            re.sub(f"^(# [A-Z]+ )?{prefix}_", r"\1", line) for line in lines if f"{prefix}_" in line
        )

    assert len(family("public")) > len(BOUNDS)  # the comparison holds what it should
    assert family("fast") == family("public")
    for line in (
        'llmproxy_requests_total{key="worker",status="200"} 2.0',
        'llmproxy_tokens_total{key="worker",kind="input",model="gpt-4o"} 20.0',
        'llmproxy_tokens_total{key="worker",kind="output",model="gpt-4o"} 40.0',
        'llmproxy_upstream_headers_seconds_bucket{le="0.005"} 2.0',
        'llmproxy_first_byte_seconds_bucket{le="0.1"} 0.0',
        'llmproxy_first_byte_seconds_bucket{le="0.25"} 2.0',
        "llmproxy_first_byte_seconds_count 2.0",
        "llmproxy_active_streams 1.0",
    ):
        assert line in lines, f"{line!r} not on the multiprocess page:\n{done.stdout}"
