"""The Redis limiter's check script against `limits.py`'s arithmetic, in a real Redis, at a
pinned clock of today's magnitude (issue 13, items 4-5).

The script reads the time from Redis (`TIME`); here that one call is replaced by the two
arguments after its own, so that a whole burst happens at one instant and the script's answers
can be compared with the pure functions at the same `now`. Lua's `tostring` keeps 14 digits, a
tenth of a millisecond at an epoch-scale clock: stored that way, each TAT's rounding added up
and a burst of 900 admitted 899 (found by an audit; these tests failed then).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy import limiter, limits
from tests.redis_server import RedisServer

CLOCK = 1_796_192_566.123457  # seconds: 2026, the magnitude the script sees in production
TIME_CALL = "local t = redis.call('TIME')"
PINNED = "local t = {ARGV[7], ARGV[8]}"


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        client = redis.Redis(port=server.port, socket_timeout=5)
        yield client
        client.close()


@pytest.fixture(scope="module")
def pinned_check(redis_client: redis.Redis) -> str:
    """The check script with `TIME` replaced by two arguments; its SHA in the test Redis."""
    assert limiter._CHECK_SCRIPT.count(TIME_CALL) == 1, "the script no longer reads TIME so"
    sha: str = redis_client.script_load(limiter._CHECK_SCRIPT.replace(TIME_CALL, PINNED))
    return sha


def check(
    client: redis.Redis, sha: str, name: str, rpm: int, now: float, request: int
) -> list[bytes]:
    seconds = int(now)
    micros = round((now - seconds) * 1_000_000)
    keys = limiter._redis_keys(name)
    answer = client.evalsha(sha, 4, *keys, rpm, 0, 0, 0, f"r{request}", 600, seconds, micros)
    assert isinstance(answer, list)
    return answer


@pytest.mark.parametrize("rpm", [7, 600, 900, 1237, 7000, 9000])
def test_a_whole_burst_at_one_instant_admits_exactly_the_limit(
    redis_client: redis.Redis, pinned_check: str, rpm: int
) -> None:
    name = f"burst-{rpm}"
    admitted = 0
    for request in range(rpm + 3):
        if check(redis_client, pinned_check, name, rpm, CLOCK, request)[0] != b"ok":
            break
        admitted += 1
    assert admitted == rpm


@settings(max_examples=20)
@given(
    rpm=st.integers(1, 3000),
    gaps=st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=40),
)
def test_the_script_admits_what_limits_admit_admits_at_the_same_moments(
    redis_client: redis.Redis, pinned_check: str, rpm: int, gaps: list[float]
) -> None:
    name = "sequence"
    redis_client.delete(*limiter._redis_keys(name))
    tat = 0.0
    now = CLOCK
    for request, gap in enumerate(gaps):
        # Microseconds, as Redis's TIME gives them; bursts between the gaps.
        now = round(now + gap, 6)
        for burst in range(rpm // 10 + 1):
            expected, tat_after = limits.admit(tat, now, rpm, limits.MINUTE)
            answer = check(redis_client, pinned_check, name, rpm, now, request * 1000 + burst)
            assert (answer[0] == b"ok") == expected, (request, burst)
            # The script answers the TAT it read: the one before this check, to the µs.
            assert float(answer[2]) == pytest.approx(tat, abs=1e-6)
            tat = tat_after


def test_the_stored_times_keep_microseconds(redis_client: redis.Redis, pinned_check: str) -> None:
    name = "digits"
    check(redis_client, pinned_check, name, 600, CLOCK, 0)
    stored = redis_client.get(limiter._redis_keys(name)[0])
    assert isinstance(stored, bytes)
    assert float(stored) == pytest.approx(CLOCK + 0.1, abs=1e-6)
    assert len(stored.split(b".")[1]) >= 6, stored


def test_the_release_script_stores_paid_tokens_with_microseconds(
    redis_client: redis.Redis,
) -> None:
    assert limiter._RELEASE_SCRIPT.count(TIME_CALL) == 1
    sha = redis_client.script_load(
        limiter._RELEASE_SCRIPT.replace(TIME_CALL, "local t = {ARGV[5], ARGV[6]}")
    )
    keys = limiter._redis_keys("paid")
    tpm_key, tpd_key, flight_key = keys[1], keys[2], keys[3]
    seconds, micros = int(CLOCK), round((CLOCK - int(CLOCK)) * 1_000_000)
    redis_client.evalsha(sha, 3, tpm_key, tpd_key, flight_key, 7000, 0, 1, "r", seconds, micros)
    stored = redis_client.get(tpm_key)
    assert isinstance(stored, bytes)
    assert float(stored) == pytest.approx(CLOCK + 60 / 7000, abs=1e-6)
