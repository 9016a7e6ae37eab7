"""/metrics (issue 5): counts that add up, in one process and summed over `--workers 2`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import UPSTREAM_SECRET, Target
from tests.support import llmproxy_environment, serve_subprocess

if TYPE_CHECKING:
    from fake_upstream.server import FakeUpstreamServer

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def requests_with_status(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], status: str, key: str = "-"
) -> float:
    """`llmproxy_requests_total` of one key name ("-": the proxy has no access keys)."""
    return found.get(("llmproxy_requests_total", (("key", key), ("status", status))), 0.0)


def test_metrics_count_requests_statuses_latency_and_no_secrets(
    self_hosted: Target, fake_upstream: FakeUpstreamServer
) -> None:
    url = self_hosted.proxy_url
    before = samples(url)
    for _ in range(3):
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
    limited = httpx.post(
        f"{url}/v1/chat/completions",
        json=CHAT,
        headers={"x-fake-scenario": "rate_limited"},
        timeout=10,
    )
    assert limited.status_code == 429
    after = samples(url)
    assert requests_with_status(after, "200") - requests_with_status(before, "200") == 3
    assert requests_with_status(after, "429") - requests_with_status(before, "429") == 1
    histogram = ("llmproxy_upstream_headers_seconds_count", ())
    assert after[histogram] - before.get(histogram, 0.0) == 4
    assert after[("llmproxy_active_streams", ())] == 0
    page = httpx.get(f"{url}/metrics", timeout=10).text
    for secret in (UPSTREAM_SECRET, *self_hosted.default_headers.values()):
        assert secret not in page


def test_metrics_add_up_over_two_workers(fake_upstream: FakeUpstreamServer) -> None:
    env = llmproxy_environment(LLMPROXY_UPSTREAM_URL=fake_upstream.base_url)
    with serve_subprocess(env, "--workers", "2") as (_, url):
        # New connections each time, so the kernel spreads them over both workers.
        for _ in range(20):
            response = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10)
            assert response.status_code == 200
        # Whichever worker answers /metrics, the total is the sum over both.
        for _ in range(4):
            assert requests_with_status(samples(url), "200") == 20
