"""The Redis limiter failing open: every failure counted, one warning a minute (issue 13,
item 5). The clock is the limiter's own `time.monotonic`, moved by the test; the Redis is a
loopback port nothing listens on, so each call fails at once."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from llmproxy import limiter
from llmproxy.access import AccessKey, key_digest
from llmproxy.limits import KeyLimits
from tests.support import free_port


def limiter_errors() -> float:
    return REGISTRY.get_sample_value("llmproxy_limiter_errors_total") or 0.0


async def test_a_failing_redis_warns_once_a_minute_and_counts_every_failure(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(limiter.time, "monotonic", lambda: clock[0])
    store = limiter.RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", 0.5, fail_closed=False)
    key = AccessKey("team-w", key_digest("sk-proxy-warn"), KeyLimits(requests_per_minute=5))
    errors_before = limiter_errors()
    warned = []
    try:
        with caplog.at_level(logging.WARNING, logger="llmproxy"):
            for moment in (0.0, 1.0, 59.9, 60.0, 61.0, 119.9, 120.5):
                clock[0] = 1000.0 + moment
                caplog.clear()
                assert await store.check(key, f"slot-{moment}") is None  # open: it passes
                warned.append(
                    any("rate limiter's Redis failed" in r.getMessage() for r in caplog.records)
                )
    finally:
        await store.close()
    assert warned == [True, False, False, True, False, False, True]
    assert limiter_errors() - errors_before == 7
