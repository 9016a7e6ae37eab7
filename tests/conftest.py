"""Suite-wide settings: the Hypothesis profiles (DESIGN §8)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# CI: bounded, derandomised (the same examples every run), no per-example deadline because a
# loaded 2-core CI machine makes wall-clock deadlines flaky.
settings.register_profile(
    "ci",
    max_examples=60,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    """Contract mode (DESIGN §8.4): point the end-to-end suite at an already running proxy."""
    group = parser.getgroup("llmproxy end-to-end")
    group.addoption(
        "--proxy-url",
        default=os.environ.get("LLMPROXY_E2E_PROXY_URL"),
        help="run tests/e2e against this running proxy (e.g. http://127.0.0.1:8080) instead of "
        "starting one; its upstream must be the fake upstream given by --fake-upstream-url",
    )
    group.addoption(
        "--fake-upstream-url",
        default=os.environ.get("LLMPROXY_E2E_FAKE_UPSTREAM_URL"),
        help="the fake upstream (e.g. http://127.0.0.1:8090) behind --proxy-url",
    )
    group.addoption(
        "--proxy-default-headers",
        default=os.environ.get("LLMPROXY_E2E_DEFAULT_HEADERS"),
        help="JSON object: the default headers the proxy under test was configured with",
    )
