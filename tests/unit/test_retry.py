"""Retry decisions (DESIGN §6): a loop driven only by `decide` keeps every rule, for any input."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from multidict import CIMultiDict

from llmproxy.retry import (
    AttemptOutcome,
    OutcomeKind,
    RetryDecision,
    RetryPolicy,
    backoff_delay,
    decide,
    next_upstream,
    parse_max_attempts,
    parse_retry_after,
    parse_retry_after_cap,
    parse_retry_deadline,
    parse_retry_statuses,
)

# Wed, 21 Oct 2015 07:28:00 GMT, the date of RFC 9110's own Retry-After example.
NOW = 1445412480.0

# ---------------------------------------------------------------------------------------------
# Strategies. Every generated `retry-after` comes with the seconds it means (None if it means
# nothing), so the properties check the policy against the intent, not against the parser.

GARBAGE = [
    "",
    "   ",
    "soon",
    "nan",
    "inf",
    "-inf",
    "1e3",
    "1_000",
    "0x10",
    "5 seconds",
    "Wed, 31 Feb 2015 07:28:00 GMT",  # no such day
    "Wed, 21 Oct 99999 07:28:00 GMT",  # no such year for datetime
    "9" * 400,  # a number too large for a float
]


# Strategies are built once here: building them inside a composite costs more than drawing.
SPELLINGS = st.sampled_from([str.lower, str.title, str.upper, lambda name: name.title().swapcase()])
# Without any digit, text can be neither a number nor a date.
GARBAGE_VALUES = st.one_of(
    st.sampled_from(GARBAGE), st.text(st.characters(exclude_categories=["Nd", "Cs"]), max_size=20)
)
FORMS = st.sampled_from(["none", "ms", "seconds", "fraction", "date", "garbage"])
MILLISECONDS = st.integers(-5_000, 60_000)
SECONDS = st.integers(-100, 100)
FRACTIONS_OF_SECONDS = st.floats(-10, 100)
OTHER_HEADERS = st.dictionaries(st.sampled_from(["content-type", "x-request-id"]), st.text())


@st.composite
def retry_after_headers(draw: st.DrawFn) -> tuple[dict[str, str], float | None]:
    """Response headers carrying some `retry-after` form, and the wait in seconds they mean."""
    form = draw(FORMS)
    headers: dict[str, str] = draw(OTHER_HEADERS)
    meant: float | None
    if form == "ms":
        milliseconds = draw(MILLISECONDS)
        headers[draw(SPELLINGS)("retry-after-ms")] = str(milliseconds)
        meant = max(0.0, milliseconds / 1000)
    else:
        if form == "none":
            value, meant = None, None
        elif form == "seconds":
            seconds = draw(SECONDS)
            value, meant = str(seconds), max(0.0, float(seconds))
        elif form == "fraction":
            value = f"{draw(FRACTIONS_OF_SECONDS):.3f}"
            meant = max(0.0, float(value))
        elif form == "date":
            offset = draw(SECONDS)
            value = format_datetime(datetime.fromtimestamp(NOW + offset, UTC), usegmt=True)
            meant = max(0.0, float(offset))
        else:
            value, meant = draw(GARBAGE_VALUES), None
        if value is not None:
            headers[draw(SPELLINGS)("retry-after")] = value
        # An unusable `retry-after-ms` must fall back to `retry-after`, not hide it.
        if draw(st.booleans()):
            headers[draw(SPELLINGS)("retry-after-ms")] = draw(GARBAGE_VALUES)
    return headers, meant


@dataclass(frozen=True)
class Step:
    """One generated attempt: its outcome, what its `retry-after` means, and its timing."""

    outcome: AttemptOutcome
    meant: float | None
    duration: float  # seconds the attempt itself took
    fraction: float  # the jitter draw for this attempt


KINDS = st.sampled_from(OutcomeKind)
STATUSES = st.sampled_from([200, 201, 400, 404, 429, 500, 502, 503, 504])
DURATIONS = st.floats(0, 10)
UNIT_INTERVAL = st.floats(0, 1)
RETRY_AFTER_HEADERS = retry_after_headers()


@st.composite
def steps(draw: st.DrawFn) -> Step:
    kind = draw(KINDS)
    # `first_byte_sent` is drawn for every kind, including ones where the forwarder cannot set
    # it, so that the rule is exercised on outcomes that would otherwise be retried.
    first_byte_sent = draw(st.booleans())
    if kind is OutcomeKind.RESPONSE:
        headers, meant = draw(RETRY_AFTER_HEADERS)
        outcome = AttemptOutcome(kind, draw(STATUSES), headers, first_byte_sent)
    else:
        outcome, meant = AttemptOutcome(kind, first_byte_sent=first_byte_sent), None
    return Step(outcome, meant, draw(DURATIONS), draw(UNIT_INTERVAL))


policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 6),
    retry_statuses=st.frozensets(st.sampled_from([429, 500, 502, 503, 504])),
    deadline=st.floats(0.5, 60),
    retry_after_cap=st.floats(0.5, 30),
    base_delay=st.floats(0, 2),
    max_delay=st.floats(0, 10),
)


@dataclass(frozen=True)
class Turn:
    """What the loop saw and did after one attempt."""

    number: int
    step: Step
    elapsed: float  # seconds since the loop started, when `decide` was asked
    decision: RetryDecision


def run_loop(policy: RetryPolicy, script: list[Step]) -> list[Turn]:
    """The forwarder's loop with the I/O replaced by the script and the sleep by arithmetic."""
    turns: list[Turn] = []
    elapsed = 0.0
    for number, step in enumerate(script, start=1):
        elapsed += step.duration
        decision = decide(policy, number, step.outcome, elapsed, NOW, step.fraction)
        turns.append(Turn(number, step, elapsed, decision))
        if not decision.retry:
            break
        elapsed += decision.delay
    return turns


def retryable(policy: RetryPolicy, outcome: AttemptOutcome) -> bool:
    """Whether the outcome's kind, status and first-byte flag allow a retry at all."""
    if outcome.first_byte_sent:
        return False
    if outcome.kind is OutcomeKind.RESPONSE:
        return outcome.status in policy.retry_statuses
    return outcome.kind is OutcomeKind.CONNECT_FAILED


scripts = st.lists(steps(), min_size=1, max_size=8)

# Scripts where every attempt would be retried if nothing else stopped it, so the attempt and
# deadline limits are what ends the loop.
retryable_scripts = st.lists(
    st.builds(
        Step, st.just(AttemptOutcome.connect_failed()), st.none(), st.floats(0, 3), st.floats(0, 1)
    ),
    min_size=1,
    max_size=8,
)


def connect_failures(count: int, duration: float = 0.0, fraction: float = 1.0) -> list[Step]:
    return [Step(AttemptOutcome.connect_failed(), None, duration, fraction)] * count


def listed_response(
    status: int, headers: dict[str, str], meant: float | None, **flags: bool
) -> Step:
    return Step(AttemptOutcome.response(status, headers, **flags), meant, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Properties of the loop.

EVERYTHING_RETRIED = RetryPolicy(max_attempts=4, retry_statuses=frozenset({429, 503}))


@given(policies, scripts)
@example(EVERYTHING_RETRIED, connect_failures(8))
@example(RetryPolicy(max_attempts=1), connect_failures(2))
def test_never_more_than_max_attempts(policy: RetryPolicy, script: list[Step]) -> None:
    turns = run_loop(policy, script)
    assert len(turns) <= policy.max_attempts
    assert not any(turn.decision.retry for turn in turns if turn.number >= policy.max_attempts)


@given(policies, scripts)
@example(
    RetryPolicy(deadline=1.0, base_delay=1.0),
    [listed_response(503, {}, None), *connect_failures(2, duration=0.9)],
)
@example(RetryPolicy(deadline=1.0, base_delay=10.0, max_delay=10.0), connect_failures(3))
@example(
    RetryPolicy(deadline=5.0, retry_statuses=frozenset({429})),
    [listed_response(429, {"retry-after": "5"}, 5.0)] * 2,
)
def test_never_waits_past_the_deadline(policy: RetryPolicy, script: list[Step]) -> None:
    for turn in run_loop(policy, script):
        if turn.decision.retry:
            assert turn.elapsed + turn.decision.delay < policy.deadline


@given(policies, scripts)
@example(
    RetryPolicy(retry_statuses=frozenset({429}), retry_after_cap=20.0, deadline=60.0),
    [listed_response(429, {"Retry-After": "21"}, 21.0)] * 2,
)
@example(
    RetryPolicy(retry_statuses=frozenset({429}), retry_after_cap=5.0, max_delay=0.0),
    [listed_response(429, {"retry-after-ms": "4000"}, 4.0)] * 2,
)
def test_retry_after_is_honoured_up_to_the_cap_and_never_beyond(
    policy: RetryPolicy, script: list[Step]
) -> None:
    for turn in run_loop(policy, script):
        decision, meant = turn.decision, turn.step.meant
        if not decision.retry:
            assert decision.delay == 0.0
            continue
        backoff_ceiling = min(policy.max_delay, policy.base_delay * 2.0 ** (turn.number - 1))
        assert 0.0 <= decision.delay <= max(backoff_ceiling, policy.retry_after_cap)
        if meant is not None:
            # Asked for longer than the cap: the response goes back as it is, no early retry.
            assert meant <= policy.retry_after_cap
            assert decision.delay >= meant


@given(policies, scripts)
@example(
    EVERYTHING_RETRIED,
    [Step(AttemptOutcome(OutcomeKind.CONNECT_FAILED, first_byte_sent=True), None, 0, 0)] * 2,
)
@example(EVERYTHING_RETRIED, [listed_response(503, {}, None, first_byte_sent=True)] * 2)
def test_never_retries_after_the_first_byte(policy: RetryPolicy, script: list[Step]) -> None:
    for turn in run_loop(policy, script):
        if turn.step.outcome.first_byte_sent:
            assert not turn.decision.retry


@given(policies, scripts)
@example(RetryPolicy(), [listed_response(503, {}, None)] * 2)
@example(EVERYTHING_RETRIED, [listed_response(502, {}, None)] * 2)
@example(EVERYTHING_RETRIED, [listed_response(200, {}, None)] * 2)
def test_never_retries_a_status_not_listed(policy: RetryPolicy, script: list[Step]) -> None:
    for turn in run_loop(policy, script):
        outcome = turn.step.outcome
        if outcome.kind is OutcomeKind.RESPONSE and outcome.status not in policy.retry_statuses:
            assert not turn.decision.retry


@given(policies, scripts)
@example(EVERYTHING_RETRIED, [Step(AttemptOutcome.failed_after_send(), None, 0, 0)] * 2)
def test_never_retries_a_request_the_upstream_may_have_received(
    policy: RetryPolicy, script: list[Step]
) -> None:
    for turn in run_loop(policy, script):
        if turn.step.outcome.kind is OutcomeKind.FAILED_AFTER_SEND:
            assert not turn.decision.retry


@given(policies, scripts)
@example(EVERYTHING_RETRIED, connect_failures(2))
@example(EVERYTHING_RETRIED, [listed_response(429, {"retry-after": "2"}, 2.0)] * 2)
def test_retries_whenever_every_rule_allows_it(policy: RetryPolicy, script: list[Step]) -> None:
    """The other side of the rules: a policy that never retried would pass all of the above."""
    for turn in run_loop(policy, script):
        step = turn.step
        allowed = (
            retryable(policy, step.outcome)
            and turn.number < policy.max_attempts
            and (step.meant is None or step.meant <= policy.retry_after_cap)
        )
        expected_delay = max(
            backoff_delay(turn.number, policy, step.fraction),
            step.meant if step.meant is not None else 0.0,
        )
        if allowed and turn.elapsed + expected_delay < policy.deadline:
            assert turn.decision == RetryDecision(True, expected_delay, turn.decision.reason)
        else:
            assert not turn.decision.retry
        assert turn.decision.reason


@given(policies, retryable_scripts)
def test_retryable_failures_stop_only_at_the_attempt_limit_or_the_deadline(
    policy: RetryPolicy, script: list[Step]
) -> None:
    turns = run_loop(policy, script)
    last = turns[-1]
    if last.decision.retry:
        assert len(turns) == len(script)  # the script ran out, not the policy
    else:
        at_limit = last.number == policy.max_attempts
        wait = backoff_delay(last.number, policy, last.step.fraction)
        assert at_limit or last.elapsed + wait >= policy.deadline


# ---------------------------------------------------------------------------------------------
# decide: one case per rule.

RETRYING_429 = RetryPolicy(retry_statuses=frozenset({429, 503}))

DECIDE_CASES = [
    # (policy, attempt, outcome, elapsed, random fraction, retry?, delay)
    (RetryPolicy(), 1, AttemptOutcome.connect_failed(), 0.0, 1.0, True, 0.25),
    (RetryPolicy(), 2, AttemptOutcome.connect_failed(), 0.0, 0.5, True, 0.25),
    (RetryPolicy(), 3, AttemptOutcome.connect_failed(), 0.0, 0.5, False, 0.0),
    (RetryPolicy(max_attempts=1), 1, AttemptOutcome.connect_failed(), 0.0, 0.5, False, 0.0),
    (RetryPolicy(), 1, AttemptOutcome.failed_after_send(), 0.0, 0.5, False, 0.0),
    (RetryPolicy(), 1, AttemptOutcome.failed_after_send(first_byte_sent=True), 0, 0, False, 0.0),
    (RetryPolicy(), 1, AttemptOutcome.response(503), 0.0, 0.5, False, 0.0),
    (RETRYING_429, 1, AttemptOutcome.response(503), 0.0, 1.0, True, 0.25),
    (RETRYING_429, 1, AttemptOutcome.response(200), 0.0, 1.0, False, 0.0),
    (RETRYING_429, 1, AttemptOutcome.response(502), 0.0, 1.0, False, 0.0),
    (RETRYING_429, 1, AttemptOutcome.response(503, first_byte_sent=True), 0, 1, False, 0.0),
    (RETRYING_429, 1, AttemptOutcome.response(429, {"retry-after": "5"}), 0, 1, True, 5.0),
    (RETRYING_429, 1, AttemptOutcome.response(429, {"retry-after": "0"}), 0, 1, True, 0.25),
    (RETRYING_429, 1, AttemptOutcome.response(429, {"retry-after": "20"}), 0, 0, True, 20.0),
    (RETRYING_429, 1, AttemptOutcome.response(429, {"retry-after": "21"}), 0, 0, False, 0.0),
    (RETRYING_429, 1, AttemptOutcome.response(429, {"retry-after": "5"}), 24.9, 0, True, 5.0),
    (RETRYING_429, 1, AttemptOutcome.response(429, {"retry-after": "5"}), 25.0, 0, False, 0.0),
    (RETRYING_429, 1, AttemptOutcome.response(429, {"retry-after": "soon"}), 0, 1, True, 0.25),
    (RetryPolicy(), 1, AttemptOutcome.connect_failed(), 30.0, 0.0, False, 0.0),
]


@pytest.mark.parametrize(
    ("policy", "attempt", "outcome", "elapsed", "fraction", "retry", "delay"), DECIDE_CASES
)
def test_decide(
    policy: RetryPolicy,
    attempt: int,
    outcome: AttemptOutcome,
    elapsed: float,
    fraction: float,
    retry: bool,
    delay: float,
) -> None:
    decision = decide(policy, attempt, outcome, elapsed, NOW, fraction)
    assert (decision.retry, decision.delay) == (retry, delay)
    assert decision.reason


def test_decide_reasons_name_the_rule() -> None:
    policy = RetryPolicy(retry_statuses=frozenset({429}))
    too_long = AttemptOutcome.response(429, {"retry-after": "60"})
    assert "cap" in decide(policy, 1, too_long, 0.0, NOW, 0.5).reason
    assert "deadline" in decide(policy, 1, AttemptOutcome.connect_failed(), 30, NOW, 0.5).reason
    assert (
        "no attempts left" in decide(policy, 3, AttemptOutcome.connect_failed(), 0, NOW, 0).reason
    )
    assert "404" in decide(policy, 1, AttemptOutcome.response(404), 0, NOW, 0).reason


def test_decide_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        decide(RetryPolicy(), 0, AttemptOutcome.connect_failed(), 0.0, NOW, 0.5)


# ---------------------------------------------------------------------------------------------
# parse_retry_after

RETRY_AFTER_CASES = [
    ({"retry-after-ms": "1500"}, 1.5),
    ({"Retry-After-Ms": "250.5"}, 0.2505),
    ({"retry-after-ms": "-100"}, 0.0),
    ({"retry-after": "7"}, 7.0),
    ({"RETRY-AFTER": "1.5"}, 1.5),
    ({"retry-after": " 3 "}, 3.0),
    ({"retry-after": "+2"}, 2.0),
    ({"retry-after": "-4"}, 0.0),
    ({"retry-after-ms": "500", "retry-after": "9"}, 0.5),  # the finer one wins
    ({"retry-after-ms": "soon", "retry-after": "2"}, 2.0),  # unusable ms falls back
    ({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, 30.0),
    ({"retry-after": "Wednesday, 21-Oct-15 07:28:10 GMT"}, 10.0),  # RFC 850, obsolete
    ({"retry-after": "Wed Oct 21 07:28:05 2015"}, 5.0),  # asctime, obsolete, no zone: GMT
    ({"retry-after": "Wed, 21 Oct 2015 07:27:00 GMT"}, 0.0),  # in the past
    ({"retry-after": "Wed, 21 Oct 2015 09:28:00 +0200"}, 0.0),  # 07:28 GMT, now
    ({}, None),
    ({"content-type": "application/json"}, None),
    ({"retry-after-ms": "soon"}, None),
    *(({"retry-after": value}, None) for value in GARBAGE),
]


@pytest.mark.parametrize(("headers", "expected"), RETRY_AFTER_CASES)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, NOW) == expected


def test_parse_retry_after_reads_the_upstream_clients_header_type() -> None:
    assert parse_retry_after(CIMultiDict({"Retry-After": "3"}), NOW) == 3.0


@given(RETRY_AFTER_HEADERS, st.integers(-(10**6), 10**6))
def test_parse_retry_after_means_what_was_sent(
    sent: tuple[dict[str, str], float | None], clock_shift: int
) -> None:
    headers, meant = sent
    assert parse_retry_after(headers, NOW) == meant
    # A date is read relative to `now`; any other form is not.
    shifted = parse_retry_after(headers, NOW + clock_shift)
    assert shifted is None or shifted >= 0.0


# ---------------------------------------------------------------------------------------------
# backoff_delay and next_upstream


@pytest.mark.parametrize(
    ("attempt", "fraction", "expected"),
    [
        (1, 1.0, 0.25),
        (2, 1.0, 0.5),
        (3, 1.0, 1.0),
        (6, 1.0, 8.0),
        (7, 1.0, 8.0),
        (3, 0.5, 0.5),
        (1, 0.0, 0.0),
        (10_000, 1.0, 8.0),
    ],
)
def test_backoff_delay(attempt: int, fraction: float, expected: float) -> None:
    assert backoff_delay(attempt, RetryPolicy(), fraction) == expected


@given(policies, st.integers(1, 5_000), st.floats(0, 1))
def test_backoff_is_full_jitter_below_the_exponential_ceiling(
    policy: RetryPolicy, attempt: int, fraction: float
) -> None:
    ceiling = min(policy.max_delay, policy.base_delay * 2.0 ** min(attempt - 1, 1000))
    delay = backoff_delay(attempt, policy, fraction)
    assert 0.0 <= delay <= ceiling <= policy.max_delay
    assert backoff_delay(attempt, policy, 1.0) == ceiling


@pytest.mark.parametrize(("attempt", "fraction"), [(0, 0.5), (1, -0.1), (1, 1.5)])
def test_backoff_rejects_impossible_inputs(attempt: int, fraction: float) -> None:
    with pytest.raises(ValueError, match=r"attempt|random_fraction"):
        backoff_delay(attempt, RetryPolicy(), fraction)


@pytest.mark.parametrize(
    ("index", "count", "expected"), [(0, 1, 0), (0, 2, 1), (1, 2, 0), (1, 3, 2), (2, 3, 0)]
)
def test_next_upstream(index: int, count: int, expected: int) -> None:
    assert next_upstream(index, count) == expected


@given(st.integers(1, 20))
def test_failover_visits_every_upstream_in_turn(count: int) -> None:
    visited = [0]
    for _ in range(count - 1):
        visited.append(next_upstream(visited[-1], count))
    assert visited == list(range(count))
    assert next_upstream(visited[-1], count) == 0


def test_next_upstream_needs_an_upstream() -> None:
    with pytest.raises(ValueError, match="at least one"):
        next_upstream(0, 0)


# ---------------------------------------------------------------------------------------------
# Immutable data


def test_policy_and_outcome_are_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RetryPolicy().max_attempts = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        AttemptOutcome.connect_failed().first_byte_sent = True  # type: ignore[misc]
    assert hash(AttemptOutcome.response(429, {"retry-after": "1"}))


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"retry_statuses": frozenset({200})}, "400 to 599"),
        ({"deadline": 0.0}, "deadline"),
        ({"retry_after_cap": float("inf")}, "retry_after_cap"),
        ({"base_delay": -1.0}, "base_delay"),
        ({"max_delay": float("nan")}, "max_delay"),
    ],
)
def test_policy_rejects_impossible_values(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        RetryPolicy(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Settings parsers


@pytest.mark.parametrize(("raw", "expected"), [("1", 1), ("3", 3), (" 5 ", 5), (10, 10), ("+2", 2)])
def test_parse_max_attempts(raw: object, expected: int) -> None:
    assert parse_max_attempts(raw) == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("0", "at least 1"),
        ("-1", "at least 1"),
        (0, "at least 1"),
        ("three", "whole number"),
        ("2.5", "whole number"),
        (2.0, "whole number"),
        (True, "whole number"),
        ("", "whole number"),
    ],
)
def test_parse_max_attempts_rejects(raw: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_max_attempts(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", frozenset()),
        ("  ", frozenset()),
        ([], frozenset()),
        ("429", frozenset({429})),
        ("429,503", frozenset({429, 503})),
        (" 429 , 502,503 ,504", frozenset({429, 502, 503, 504})),
        ("429,429", frozenset({429})),
        ([429, 503], frozenset({429, 503})),
        ("400,599", frozenset({400, 599})),
    ],
)
def test_parse_retry_statuses(raw: object, expected: frozenset[int]) -> None:
    assert parse_retry_statuses(raw) == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("429,", "not an HTTP status"),
        ("429;503", "not an HTTP status"),
        ("42", "not an HTTP status"),
        ("4290", "not an HTTP status"),
        ("abc", "not an HTTP status"),
        ("+429", "not an HTTP status"),
        ("200", "not an error status"),
        ("399", "not an error status"),
        ("600", "not an error status"),
        ([429, "x"], "not an HTTP status"),
        ([429, True], "not an HTTP status"),
        ([200], "not an error status"),
        (429, "separated by commas"),
        ({"429": 1}, "separated by commas"),
    ],
)
def test_parse_retry_statuses_rejects(raw: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_retry_statuses(raw)


@pytest.mark.parametrize("parse", [parse_retry_deadline, parse_retry_after_cap])
@pytest.mark.parametrize(
    ("raw", "expected"), [("30", 30.0), (" 2.5 ", 2.5), (20, 20.0), (0.5, 0.5)]
)
def test_parse_seconds_settings(
    parse: Callable[[object], float], raw: object, expected: float
) -> None:
    assert parse(raw) == expected


@pytest.mark.parametrize("parse", [parse_retry_deadline, parse_retry_after_cap])
@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("0", "positive"),
        ("-1", "positive"),
        ("nan", "positive"),
        ("inf", "positive"),
        (0, "positive"),
        ("soon", "a number"),
        ("", "a number"),
        (True, "a number"),
        ([30], "a number"),
    ],
)
def test_parse_seconds_settings_reject(
    parse: Callable[[object], float], raw: object, fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse(raw)


@pytest.fixture
def local_time_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone set far from UTC, so that dates read as local time show."""
    monkeypatch.setenv("TZ", "XST-14")  # POSIX form (UTC+14): needs no tz database
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_time_not_utc")
def test_http_dates_without_a_zone_are_gmt_whatever_the_local_zone() -> None:
    assert parse_retry_after({"retry-after": "Wed Oct 21 07:28:05 2015"}, NOW) == 5.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:05 -0000"}, NOW) == 5.0
