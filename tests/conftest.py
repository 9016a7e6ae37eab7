"""Suite-wide settings: the Hypothesis profiles (DESIGN §8)."""

from __future__ import annotations

import os

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
