"""Per-key limits (issue 13 item 4, DESIGN §11): the GCRA arithmetic of `llmproxy.limits` as
Hypothesis properties, then `limiter.decide` and `MemoryLimiter` driven by an injected clock,
so no test waits for a window to free.

Requests are the one limit paid before forwarding, unit by unit (`admit`), and always per
minute; tokens are post-paid (`charge`, `at_or_over`) per minute and per day. `now` is a
monotonic clock (seconds since boot) from boot to a year of uptime: a TAT is a float sum whose
rounding grows with the clock, and a fixed tolerance once made a burst of 600 a day after boot
admit 599 (the explicit examples below).
"""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from llmproxy.access import AccessKey, key_digest
from llmproxy.limiter import LimitRefusal, MemoryLimiter, decide
from llmproxy.limits import (
    DAY,
    MINUTE,
    KeyLimits,
    admit,
    at_or_over,
    charge,
    interval,
    post_paid_retry_after,
    reset_header,
    retry_after_header,
    window_state,
)

# Seconds since boot: the first hour, and up to a year, where float rounding is coarser.
uptime = st.floats(0.0, 3600.0, allow_nan=False) | st.floats(3600.0, 3.2e7, allow_nan=False)
request_limits = st.integers(1, 1000)  # properties below spend these one unit at a time
token_limits = st.integers(1, 10_000_000)
token_windows = st.sampled_from([MINUTE, DAY])


def spend_one_by_one(tat: float, now: float, limit: int, window: float) -> tuple[int, float]:
    """Admit one unit at a time at `now` until one is refused: how many were, and the TAT."""
    admitted = 0
    while admitted <= limit:  # one more than can ever fit, so a runaway admit shows
        fits, after = admit(tat, now, limit, window)
        if not fits:
            assert after == tat  # a refusal leaves the state as it was
            break
        admitted, tat = admitted + 1, after
    return admitted, tat


# -- the burst is the limit, and it frees within one window ---------------------------------------


@given(limit=request_limits, now=uptime, idle=st.floats(0.0, 1e6))
@example(limit=600, now=86400.0, idle=0.0)  # the README's 600 per minute, a day after boot
def test_a_fresh_or_idle_key_admits_exactly_its_limit_at_once_then_refuses(
    limit: int, now: float, idle: float
) -> None:
    tat = max(0.0, now - idle)  # 0.0 is a key never seen; any past TAT owes nothing
    admitted, tat = spend_one_by_one(tat, now, limit, MINUTE)
    assert admitted == limit
    assert admit(tat, now, limit, MINUTE) == (False, tat)
    # The same burst paid at once, as a cost: the whole limit fits, one more does not.
    assert admit(0.0, now, limit, MINUTE, cost=limit)[0]
    assert not admit(0.0, now, limit, MINUTE, cost=limit + 1)[0]


@given(limit=request_limits, now=uptime)
@example(limit=600, now=86400.0)
def test_after_a_full_burst_the_whole_limit_is_free_again_one_window_later(
    limit: int, now: float
) -> None:
    _, tat = spend_one_by_one(0.0, now, limit, MINUTE)
    assert spend_one_by_one(tat, now + MINUTE, limit, MINUTE)[0] == limit
    state = window_state(tat, now + MINUTE, limit, MINUTE)
    assert state.retry_after_seconds == 0.0
    assert state.reset_seconds == pytest.approx(0.0, abs=1e-3)
    # ...and not before: half a unit's interval earlier, one unit is still held.
    earlier = now + MINUTE - interval(limit, MINUTE) / 2
    assert spend_one_by_one(tat, earlier, limit, MINUTE)[0] == limit - 1


@given(limit=request_limits, now=uptime, data=st.data())
def test_after_a_full_burst_one_unit_frees_every_window_over_limit(
    limit: int, now: float, data: st.DataObject
) -> None:
    _, tat = spend_one_by_one(0.0, now, limit, MINUTE)
    step = MINUTE / limit
    freed = data.draw(st.integers(1, limit), label="units freed")
    assert spend_one_by_one(tat, now + freed * step, limit, MINUTE)[0] == freed
    assert spend_one_by_one(tat, now + (freed - 0.5) * step, limit, MINUTE)[0] == freed - 1


@given(
    limit=request_limits,
    now=uptime,
    owed=st.floats(-1.0, 1.0),  # in windows: negative is a TAT in the past
    burst=st.booleans(),  # or the TAT a burst of that many units left
)
@example(limit=951, now=1002.0, owed=1.0, burst=True)  # once said 950 while 951 passed
@example(limit=600, now=86400.0, owed=0.0, burst=False)  # once said 600 while 599 passed
def test_remaining_is_how_many_admits_succeed_now(
    limit: int, now: float, owed: float, burst: bool
) -> None:
    """`remaining` goes out as x-ratelimit-remaining-requests: it must be what would pass."""
    if burst:
        _, tat = spend_one_by_one(0.0, now, limit, MINUTE)
        now += abs(owed) * MINUTE  # some time after the burst
    else:
        tat = now + owed * MINUTE
    state = window_state(tat, now, limit, MINUTE)
    admitted, _ = spend_one_by_one(tat, now, limit, MINUTE)
    assert state.remaining == admitted
    assert state.limit == limit
    assert state.reset_seconds == max(0.0, tat - now)
    assert (state.retry_after_seconds == 0.0) == (admitted >= 1)


@given(
    limit=request_limits,
    now=uptime,
    short=st.floats(1e-3, 1.0),  # of one unit: how far the allowance is from fitting one more
)
def test_a_refusals_retry_after_is_exactly_when_the_next_admit_succeeds(
    limit: int, now: float, short: float
) -> None:
    step = MINUTE / limit
    tat = now + MINUTE - step + short * step  # less than one unit left: refused now
    assert not admit(tat, now, limit, MINUTE)[0]
    wait = window_state(tat, now, limit, MINUTE).retry_after_seconds
    assert wait == pytest.approx(short * step, abs=1e-3)
    before = min(1e-3, wait / 2)  # a millisecond: the finest any header tells a client
    assert not admit(tat, now + wait - before, limit, MINUTE)[0]  # not before
    assert admit(tat, now + wait + 1e-6, limit, MINUTE)[0]  # at, give or take a microsecond
    # The header a client reads is whole seconds, never short of the wait.
    assert admit(tat, now + int(retry_after_header(wait)), limit, MINUTE)[0]


# -- post-paid tokens ------------------------------------------------------------------------------


@given(limit=token_limits, window=token_windows, now=uptime, data=st.data())
def test_post_paid_tokens_may_overshoot_and_refuse_until_the_retry_after_has_passed(
    limit: int, window: float, now: float, data: st.DataObject
) -> None:
    costs = data.draw(st.lists(st.integers(0, 3 * limit), min_size=1, max_size=4), label="costs")
    tat = 0.0
    for cost in costs:
        tat = charge(tat, now, limit, window, cost)  # never refuses: the answer is over
    spent = sum(costs)
    assert tat - max(0.0, now) == pytest.approx(spent * window / limit, rel=1e-9, abs=1e-6)
    assert at_or_over(tat, now, limit, window) == (spent >= limit)
    wait = post_paid_retry_after(tat, now, limit, window)
    if spent < limit:
        assert wait == pytest.approx(0.0, abs=1e-3)
        return
    assert wait == pytest.approx((spent - limit) * window / limit, abs=1e-3)
    if wait > 2e-3:
        assert at_or_over(tat, now + wait - 1e-3, limit, window)  # still refused just before
    assert not at_or_over(tat, now + wait + 1e-3, limit, window)  # free just after
    assert window_state(tat, now, limit, window).remaining == 0


@given(limit=token_limits, window=token_windows, now=uptime, excess=st.floats(0.0, 2.0))
@example(limit=60, window=MINUTE, now=0.0, excess=70 / 60)  # 130 tokens of a 60/min key
def test_a_client_that_waits_a_tokens_refusals_retry_after_is_admitted(
    limit: int, window: float, now: float, excess: float
) -> None:
    """retry-after is "whole seconds until it frees" (issue 13): waiting it must be enough."""
    cost = limit + round(excess * limit)
    tat = charge(0.0, now, limit, window, cost)
    assert at_or_over(tat, now, limit, window)
    waited = int(retry_after_header(post_paid_retry_after(tat, now, limit, window)))
    assert not at_or_over(tat, now + waited, limit, window)


# -- the headers' formats --------------------------------------------------------------------------


@given(seconds=st.floats(0.0, 1e7, allow_nan=False))
@example(seconds=0.0)
@example(seconds=0.2)
@example(seconds=1.0)
@example(seconds=59.0)
@example(seconds=59.000000001)
def test_retry_after_is_whole_seconds_at_least_one_and_never_short(seconds: float) -> None:
    header = retry_after_header(seconds)
    assert re.fullmatch(r"[1-9][0-9]*", header)
    value = int(header)
    assert value >= 1
    assert value >= seconds - 1e-9  # waiting it is enough
    assert value < max(1.0, seconds) + 1  # and at most a second more than needed


RESET_CASES = [
    (0.0, "0ms"),
    (0.02, "20ms"),
    (0.5, "500ms"),
    (1.0, "1s"),
    (1.5, "1.5s"),
    (17.436, "17.436s"),
    (60.0, "1m0s"),
    (72.0, "1m12s"),
    (360.0, "6m0s"),  # as OpenAI sends x-ratelimit-reset-tokens
    (3600.0, "1h0m0s"),
    (3723.0, "1h2m3s"),
    (86400.0, "24h0m0s"),
]


@pytest.mark.parametrize(("seconds", "header"), RESET_CASES)
def test_reset_header_is_openais_duration_format(seconds: float, header: str) -> None:
    assert reset_header(seconds) == header


_DURATION = re.compile(
    r"(?P<ms>\d+)ms|(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?P<s>\d+(?:\.\d{1,3})?)s", re.ASCII
)


def parse_duration(text: str) -> tuple[float, dict[str, str | None]]:
    match = _DURATION.fullmatch(text)
    assert match, text
    parts = match.groupdict()
    if parts["ms"] is not None:
        return int(parts["ms"]) / 1000, parts
    hours, minutes = int(parts["h"] or 0), int(parts["m"] or 0)
    assert parts["s"] is not None
    return hours * 3600 + minutes * 60 + float(parts["s"]), parts


@given(seconds=st.floats(0.0, 2 * DAY, allow_nan=False))
def test_reset_header_reads_back_as_the_time_to_reset(seconds: float) -> None:
    value, _ = parse_duration(reset_header(seconds))
    # Milliseconds and seconds round to the millisecond; minutes and hours up to the second.
    assert seconds - 0.0005 - 1e-9 <= value <= seconds + 1


@given(seconds=st.floats(0.0, 2 * DAY, allow_nan=False))
@example(seconds=119.5)  # "1m60s"
@example(seconds=3599.5)  # "59m60s"
@example(seconds=59.9996)  # "60s"
def test_reset_headers_parts_stay_in_range(seconds: float) -> None:
    """Like Go's time.Duration.String(), which OpenAI's format follows: never `1m60s`."""
    _, parts = parse_duration(reset_header(seconds))
    if parts["ms"] is not None:
        assert int(parts["ms"]) <= 1000
        return
    assert parts["s"] is not None
    assert float(parts["s"]) < 60
    if parts["h"] is not None:
        assert parts["m"] is not None
        assert int(parts["m"]) < 60


# -- decide: the one verdict both stores compute ---------------------------------------------------

optional_limit = st.none() | st.integers(1, 1000)


@given(
    requests=optional_limit,
    tokens_minute=optional_limit,
    tokens_day=optional_limit,
    concurrent=optional_limit,
    now=uptime,
    owed=st.tuples(*(st.floats(-1.0, 2.0),) * 3),
    in_flight=st.integers(0, 1001),
)
def test_decide_refuses_exactly_when_one_of_the_limits_has_no_room(
    requests: int | None,
    tokens_minute: int | None,
    tokens_day: int | None,
    concurrent: int | None,
    now: float,
    owed: tuple[float, float, float],
    in_flight: int,
) -> None:
    limits = KeyLimits(requests, tokens_minute, tokens_day, concurrent)
    tats = (now + owed[0] * MINUTE, now + owed[1] * MINUTE, now + owed[2] * DAY)
    refused, new_tat = decide(limits, tats, in_flight, now)
    over = []
    if tokens_minute is not None and at_or_over(tats[1], now, tokens_minute, MINUTE):
        over.append("tokens_per_minute")
    if tokens_day is not None and at_or_over(tats[2], now, tokens_day, DAY):
        over.append("tokens_per_day")
    if requests is not None and not admit(tats[0], now, requests, MINUTE)[0]:
        over.append("requests_per_minute")
    if concurrent is not None and in_flight >= concurrent:
        over.append("max_concurrent")
    if not over:
        assert refused is None
        expected = admit(tats[0], now, requests, MINUTE)[1] if requests else tats[0]
        assert new_tat == expected
        return
    assert refused is not None
    assert refused.limit == over[0]  # tokens first, then requests, then concurrency
    assert refused.kind == ("tokens" if over[0].startswith("tokens") else "requests")
    assert refused.value == getattr(limits, over[0])
    assert refused.retry_after > 0 or over[0].startswith("tokens")  # at the limit: 0, header 1
    assert int(dict(refused.headers)[b"retry-after"]) >= 1


# -- MemoryLimiter with an injected clock ----------------------------------------------------------


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


SECRETS = {"team-a": "sk-proxy-team-a-SECRET-0001", "team-b": "sk-proxy-team-b-SECRET-0002"}


def limited_key(name: str, **limits: int) -> AccessKey:
    return AccessKey(name, key_digest(SECRETS[name]), KeyLimits(**limits))


def admitted(limiter: MemoryLimiter, key: AccessKey, times: int) -> int:
    """How many of `times` checks at this instant pass (each keeps its slot)."""
    return sum(limiter.check(key, f"req-{i}") is None for i in range(times))


def refused(limiter: MemoryLimiter, key: AccessKey) -> LimitRefusal:
    refusal = limiter.check(key, "req-refused")
    assert refusal is not None
    return refusal


def headers_of(refusal: LimitRefusal) -> dict[str, str]:
    names = [name for name, _ in refusal.headers]
    assert len(names) == len(set(names))
    return {name.decode(): value.decode() for name, value in refusal.headers}


def test_requests_per_minute_burst_then_free_one_by_one() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock)
    key = limited_key("team-a", requests_per_minute=3)
    assert admitted(limiter, key, 4) == 3
    refusal = refused(limiter, key)
    assert (refusal.limit, refusal.kind, refusal.value) == ("requests_per_minute", "requests", 3)
    assert refusal.retry_after == pytest.approx(20.0)
    clock.advance(19.9)
    assert limiter.check(key, "early") is not None
    clock.advance(0.1)
    assert admitted(limiter, key, 2) == 1  # one unit freed after 60/3 s
    clock.advance(60)
    assert admitted(limiter, key, 4) == 3  # the whole limit after a window


def test_memory_limiter_admits_a_600_request_burst_a_day_after_boot() -> None:
    """The README's requests_per_minute = 600 on a machine whose monotonic clock reads 1 day."""
    limiter = MemoryLimiter(Clock(now=86400.0))
    assert admitted(limiter, limited_key("team-a", requests_per_minute=600), 601) == 600


def test_tokens_per_minute_are_paid_after_the_answer_and_may_overshoot() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock)
    key = limited_key("team-a", tokens_per_minute=100)
    assert admitted(limiter, key, 2) == 2  # both in flight: nothing is paid yet
    limiter.release(key, "req-0", 149)  # over the limit by itself: post-paid, so charged
    limiter.release(key, "req-1", 0)
    refusal = refused(limiter, key)
    assert (refusal.limit, refusal.kind, refusal.value) == ("tokens_per_minute", "tokens", 100)
    assert refusal.retry_after == pytest.approx(149 * 0.6 - 60)
    assert headers_of(refusal)["retry-after"] == "30"
    assert headers_of(refusal)["x-ratelimit-remaining-tokens"] == "0"
    clock.advance(29.3)
    assert limiter.check(key, "early") is not None
    clock.advance(0.2)
    assert limiter.check(key, "late") is None


def test_tokens_per_day_hold_past_a_minute_and_free_within_the_day() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock)
    key = limited_key("team-a", tokens_per_day=1000)
    assert limiter.check(key, "big") is None
    limiter.release(key, "big", 1500)
    refusal = refused(limiter, key)
    assert (refusal.limit, refusal.kind, refusal.value) == ("tokens_per_day", "tokens", 1000)
    assert refusal.retry_after == pytest.approx(500 * DAY / 1000)
    headers = headers_of(refusal)
    assert headers["retry-after"] in ("43200", "43201")  # half a day's worth over, rounded up
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    # Until the whole day is back: 1.5 days' worth of tokens spent.
    assert parse_duration(headers["x-ratelimit-reset-tokens"])[0] == pytest.approx(1.5 * DAY, abs=1)
    clock.advance(3600)
    assert limiter.check(key, "an-hour-later") is not None
    clock.advance(43200 - 3600 + 0.5)
    assert limiter.check(key, "half-a-day-later") is None


def test_max_concurrent_refuses_beyond_it_and_a_released_slot_frees_it() -> None:
    limiter = MemoryLimiter(Clock())
    key = limited_key("team-a", max_concurrent=2, requests_per_minute=3)
    assert limiter.check(key, "one") is None
    assert limiter.check(key, "two") is None
    refusal = refused(limiter, key)
    assert (refusal.limit, refusal.kind, refusal.value) == ("max_concurrent", "requests", 2)
    assert headers_of(refusal)["retry-after"] == "1"
    limiter.release(key, "one", 0)
    # The refusal took nothing: all or nothing, so the third of three requests still fits.
    assert limiter.check(key, "three") is None
    limiter.release(key, "two", 0)
    limiter.release(key, "three", 0)
    assert refused(limiter, key).limit == "requests_per_minute"


def test_two_keys_do_not_affect_each_other() -> None:
    limiter = MemoryLimiter(Clock())
    limits = {"requests_per_minute": 2, "tokens_per_minute": 100, "max_concurrent": 1}
    team_a, team_b = limited_key("team-a", **limits), limited_key("team-b", **limits)
    assert limiter.check(team_a, "a-1") is None
    assert refused(limiter, team_a).limit == "max_concurrent"
    assert limiter.check(team_b, "b-1") is None  # a's slot is a's
    limiter.release(team_a, "a-1", 500)
    assert refused(limiter, team_a).limit == "tokens_per_minute"
    limiter.release(team_b, "b-1", 0)
    assert limiter.check(team_b, "b-2") is None  # a's tokens are a's
    limiter.release(team_b, "b-2", 0)
    assert refused(limiter, team_b).limit == "requests_per_minute"


REFUSALS = [
    # limits, tokens paid by a first request, the limit refused, OpenAI's type, the message's
    (
        {"requests_per_minute": 1, "tokens_per_minute": 1000},
        0,
        "requests_per_minute",
        "requests",
        "1 requests per minute",
    ),
    ({"tokens_per_minute": 1000}, 1000, "tokens_per_minute", "tokens", "1000 tokens per minute"),
    ({"tokens_per_day": 5000}, 6000, "tokens_per_day", "tokens", "5000 tokens per day"),
    ({"max_concurrent": 1}, None, "max_concurrent", "requests", "1 concurrent requests"),
]


@pytest.mark.parametrize(("limits", "paid", "limit", "kind", "named"), REFUSALS)
def test_the_429_names_the_limit_in_openais_shape_and_never_the_key(
    limits: dict[str, int], paid: int | None, limit: str, kind: str, named: str
) -> None:
    limiter = MemoryLimiter(Clock())
    key = limited_key("team-a", **limits)
    assert limiter.check(key, "first") is None
    if paid is not None:
        limiter.release(key, "first", paid)
    refusal = refused(limiter, key)
    error = refusal.error()
    assert error.status == 429
    assert error.code == "rate_limit_exceeded"
    assert error.type == kind
    assert limit in error.message
    assert named in error.message
    assert f"Try again in {headers_of(refusal)['retry-after']} s" in error.message
    body = json.loads(error.body())
    assert body == {
        "error": {"message": error.message, "type": kind, "param": None, "code": error.code}
    }
    for text in (error.message, json.dumps(headers_of(refusal))):
        assert SECRETS["team-a"] not in text
        assert key.sha256.hex() not in text
        assert key.sha256.hex()[:8] not in text


def test_the_429_carries_openais_requests_and_tokens_headers() -> None:
    limiter = MemoryLimiter(Clock())
    key = limited_key("team-a", requests_per_minute=3, tokens_per_minute=1000)
    assert admitted(limiter, key, 3) == 3
    limiter.release(key, "req-0", 400)
    assert headers_of(refused(limiter, key)) == {
        "retry-after": "20",
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "600",
        "x-ratelimit-reset-tokens": "24s",  # 400 tokens at 1000 per minute
    }


def test_the_429_of_a_key_limited_per_day_only_carries_the_days_tokens_headers() -> None:
    limiter = MemoryLimiter(Clock())
    key = limited_key("team-a", tokens_per_day=86400)
    assert limiter.check(key, "first") is None
    limiter.release(key, "first", 86400 + 30)
    headers = headers_of(refused(limiter, key))
    assert headers["retry-after"] in ("30", "31")  # 30 tokens over at one a second
    assert headers["x-ratelimit-limit-tokens"] == "86400"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert not any(name.endswith("-requests") for name in headers)
    assert math.isclose(parse_duration(headers["x-ratelimit-reset-tokens"])[0], DAY + 30)


def test_a_day_refusal_of_a_key_with_minute_and_day_limits_carries_the_days_headers() -> None:
    # Under the minute's limit and over the day's: the -tokens headers must tell the day's
    # numbers (the minute's said tokens remained on a tokens 429).
    clock = Clock()
    limiter = MemoryLimiter(clock)
    key = limited_key("team-a", tokens_per_minute=10_000, tokens_per_day=1000)
    assert limiter.check(key, "big") is None
    limiter.release(key, "big", 1500)
    clock.advance(120)  # the minute's window is whole again; the day's is not
    refusal = refused(limiter, key)
    assert refusal.limit == "tokens_per_day"
    headers = headers_of(refusal)
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
