"""Retry decisions (DESIGN §6): pure functions over immutable data, no I/O, no clock, no sleep.

The forwarder runs the loop and does the waiting; after every attempt it asks `decide` whether
to try again and after how long, passing in the time and the randomness ("compute, then act",
like stamina's `_compute_backoff`). That keeps every rule below testable with Hypothesis.

The rules, in the order `decide` applies them:

1. Nothing is retried once a byte has gone to the client: the answer is committed.
2. A response is retried only if its status is listed (`LLMPROXY_RETRY_STATUSES`, empty by
   default): a retried POST can bill twice, and the OpenAI SDKs already retry on their own.
3. A failure after the request may have reached the upstream (reset, read timeout, malformed
   response) is never retried, for the same reason; only connect-level failures are.
4. At most `max_attempts` attempts in all.
5. The wait is exponential backoff with full jitter, raised to the upstream's `retry-after-ms` /
   `retry-after` when it asks for longer. If it asks for longer than `retry_after_cap`, the
   response is returned as it is instead: retrying sooner than asked would only earn another
   429, and the client (whose SDK reads the same header) can decide whether to wait that long.
6. No wait may reach past the deadline of the whole loop.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from types import MappingProxyType

# This module imports nothing from llmproxy: config.py imports its parsers for the settings
# table, so reusing `config.parse_timeout` here would make the import circular.

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})

# RFC 9110 §10.2.3 delay-seconds is 1*DIGIT; fractions and a sign are tolerated (OpenAI-compatible
# servers send `retry-after: 1.5`), but not `nan`, `inf`, `1e3` or `1_000`, which `float` accepts.
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)", re.ASCII)
_STATUS = re.compile(r"\d{3}", re.ASCII)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the proxy's loop of attempts retries; built from the configuration."""

    max_attempts: int = 3
    retry_statuses: frozenset[int] = frozenset()
    deadline: float = 30.0  # seconds, for the whole loop of attempts and waits
    retry_after_cap: float = 20.0  # the longest `retry-after` the proxy will wait out
    base_delay: float = 0.25
    max_delay: float = 8.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts!r}")
        if any(not 400 <= status <= 599 for status in self.retry_statuses):
            raise ValueError("retry_statuses must be HTTP error statuses from 400 to 599")
        for name in ("deadline", "retry_after_cap"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("base_delay", "max_delay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")


class OutcomeKind(enum.Enum):
    """What became of one attempt, as far as retrying is concerned."""

    # The upstream never got the request: connection refused, DNS failure, connect timeout.
    CONNECT_FAILED = "connect_failed"
    # The request may have reached the upstream: reset, read timeout, malformed response.
    FAILED_AFTER_SEND = "failed_after_send"
    # The upstream answered with a status line and headers.
    RESPONSE = "response"


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """One attempt's result; build it with `connect_failed`, `failed_after_send` or `response`."""

    kind: OutcomeKind
    status: int | None = None
    # The response headers as received (any mapping; looked up ignoring case), read only when the
    # status is one to retry, so a 200 costs nothing here.
    headers: Mapping[str, str] = field(default_factory=lambda: _NO_HEADERS, hash=False)
    first_byte_sent: bool = False  # whether any byte of the answer already went to the client

    @classmethod
    def connect_failed(cls) -> AttemptOutcome:
        """The upstream never got the request (refused, DNS, connect timeout)."""
        return cls(OutcomeKind.CONNECT_FAILED)

    @classmethod
    def failed_after_send(cls, *, first_byte_sent: bool = False) -> AttemptOutcome:
        """The request may have reached the upstream (reset, read timeout, bad response)."""
        return cls(OutcomeKind.FAILED_AFTER_SEND, first_byte_sent=first_byte_sent)

    @classmethod
    def response(
        cls, status: int, headers: Mapping[str, str] = _NO_HEADERS, *, first_byte_sent: bool = False
    ) -> AttemptOutcome:
        """The upstream answered with `status` and `headers`."""
        return cls(OutcomeKind.RESPONSE, status, headers, first_byte_sent)


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Whether to make another attempt, after how many seconds, and why (for the log)."""

    retry: bool
    delay: float  # seconds to wait before the next attempt; 0.0 when not retrying
    reason: str


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds the upstream asks to wait (`retry-after-ms`, then `retry-after`), else None."""
    milliseconds = _header(headers, "retry-after-ms")
    if milliseconds is not None:
        value = _parse_decimal(milliseconds)
        if value is not None:
            return max(0.0, value / 1000)
        # Unusable: fall back to `retry-after`, as the OpenAI SDKs do.
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    value = _parse_decimal(raw)
    if value is not None:
        return max(0.0, value)
    return _seconds_until_http_date(raw, now)


def backoff_delay(attempt: int, policy: RetryPolicy, random_fraction: float) -> float:
    """Full-jitter exponential backoff after attempt number `attempt` (1-based)."""
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt!r}")
    if not 0.0 <= random_fraction <= 1.0:
        raise ValueError(f"random_fraction must be in [0, 1], got {random_fraction!r}")
    # Bounding the exponent keeps `2.0 ** n` finite for any attempt number; it is far past
    # the point where any max_delay has taken over.
    ceiling = min(policy.max_delay, policy.base_delay * 2.0 ** min(attempt - 1, 1000))
    return random_fraction * ceiling


def decide(
    policy: RetryPolicy,
    attempt_number: int,
    outcome: AttemptOutcome,
    elapsed: float,
    now: float,
    random_fraction: float,
) -> RetryDecision:
    """Retry after attempt `attempt_number` (1-based), and after how long? See the module rules.

    `elapsed` is the seconds since the loop started (monotonic clock), `now` the unix time (for
    an HTTP-date `retry-after`), `random_fraction` a uniform draw from [0, 1] for the jitter.
    """
    if attempt_number < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt_number!r}")
    if outcome.first_byte_sent:
        return _give_up("the response to the client has started")
    if outcome.kind is OutcomeKind.FAILED_AFTER_SEND:
        return _give_up("the request may have reached the upstream")
    if outcome.kind is OutcomeKind.RESPONSE and outcome.status not in policy.retry_statuses:
        return _give_up(f"status {outcome.status} is not retried")
    if attempt_number >= policy.max_attempts:
        return _give_up(f"attempt {attempt_number} of {policy.max_attempts}: no attempts left")

    delay = backoff_delay(attempt_number, policy, random_fraction)
    if outcome.kind is OutcomeKind.RESPONSE:
        asked = parse_retry_after(outcome.headers, now)
        if asked is not None:
            if asked > policy.retry_after_cap:
                return _give_up(
                    f"retry-after {asked:g}s is above the cap of {policy.retry_after_cap:g}s"
                )
            delay = max(delay, asked)
    # Starting an attempt exactly at the deadline would leave it no time at all.
    if elapsed + delay >= policy.deadline:
        return _give_up(
            f"waiting {delay:.3g}s after {elapsed:.3g}s would pass the "
            f"{policy.deadline:g}s deadline"
        )
    what = (
        "connect failure"
        if outcome.kind is OutcomeKind.CONNECT_FAILED
        else f"status {outcome.status}"
    )
    return RetryDecision(
        True, delay, f"{what} on attempt {attempt_number} of {policy.max_attempts}"
    )


def next_upstream(index: int, count: int) -> int:
    """The upstream URL the next attempt goes to: the following one, round robin (failover)."""
    if count < 1:
        raise ValueError(f"there must be at least one upstream, got {count!r}")
    return (index + 1) % count


def _give_up(reason: str) -> RetryDecision:
    return RetryDecision(False, 0.0, reason)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """The first value of header `name` (lowercase), whatever the case of the mapping's keys."""
    value = headers.get(name)  # the common case: a case-insensitive or lowercase mapping
    if value is not None:
        return value
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _parse_decimal(raw: str) -> float | None:
    text = raw.strip()
    if not _DECIMAL.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None  # a 400-digit number becomes inf


def _seconds_until_http_date(raw: str, now: float) -> float | None:
    """RFC 9110 §10.2.3 HTTP-date (and its obsolete forms), as seconds from `now`."""
    try:
        when = parsedate_to_datetime(raw.strip())
        if when.tzinfo is None:
            # HTTP dates are always GMT (RFC 9110 §5.6.7); the asctime form carries no zone.
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


# ---------------------------------------------------------------------------------------------
# Settings parsers for the configuration table (same contract as those in config.py): value as
# found (str from flags and environment; TOML types from the file) -> value, or ValueError with
# a message naming what is wrong.


def parse_max_attempts(raw: object) -> int:
    """How many attempts per request in all, retries included; at least 1 (1 = no retries)."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and raw.strip().lstrip("+-").isdigit():
        value = int(raw.strip())
    else:
        raise ValueError(f"must be a whole number, got {raw!r}")
    if value < 1:
        raise ValueError(f"must be a whole number of at least 1, got {raw!r}")
    return value


def parse_retry_statuses(raw: object) -> frozenset[int]:
    """Upstream statuses to retry: `429,503` or a TOML list of numbers; empty means none."""
    items: list[object]
    if isinstance(raw, str):
        if not raw.strip():
            return frozenset()
        items = [part.strip() for part in raw.split(",")]
    elif isinstance(raw, list):
        items = list(raw)
    else:
        raise ValueError(f"must be HTTP statuses separated by commas, like '429,503', got {raw!r}")
    return frozenset(_parse_status(item) for item in items)


def _parse_status(item: object) -> int:
    if isinstance(item, int) and not isinstance(item, bool):
        status = item
    elif isinstance(item, str) and _STATUS.fullmatch(item):
        status = int(item)
    else:
        raise ValueError(f"{item!r} is not an HTTP status (a 3-digit number like 429)")
    if not 400 <= status <= 599:
        raise ValueError(f"{status} is not an error status; only 400 to 599 can be retried")
    return status


def parse_retry_deadline(raw: object) -> float:
    """Seconds the whole loop of attempts and waits may take; a finite positive number."""
    return _parse_seconds(raw)


def parse_retry_after_cap(raw: object) -> float:
    """The longest `retry-after` worth waiting for, in seconds; a finite positive number."""
    return _parse_seconds(raw)


def _parse_seconds(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ValueError(f"must be a number, got {raw!r}")
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except ValueError:
        raise ValueError(f"must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number of seconds, got {raw!r}")
    return value
