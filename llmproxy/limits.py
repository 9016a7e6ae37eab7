"""Per-key limits as arithmetic (DESIGN §11): pure functions with `now` passed in, like
`retry.decide`, so the in-process store and the Redis script compute the same thing.

The algorithm is GCRA (the generic cell rate algorithm, as in ATM networks and in redis-cell)
with the burst equal to the limit. A key's state per limit is one number, its *theoretical
arrival time* (TAT): the moment its allowance would be whole again if it spent nothing more.
Each unit spent pushes the TAT `window / limit` seconds further; the allowance left at `now` is
`(window - (TAT - now)) / (window / limit)` units.

Why GCRA rather than a sliding window: the burst is exactly the limit (a key may spend its
whole per-minute allowance at once), what it spent frees smoothly and completely within one
window (a fixed window would free it all at once at the minute's turn, allowing twice the limit
across the boundary), and the state is one float per key and limit — one Redis key, updated by
one short script — where a sliding log keeps a timestamp per request.

Requests are paid before forwarding (refused when one more would not fit). Tokens are paid
after the answer, when its usage is known, so a request is refused only while the key is at or
over a token limit: a key can overshoot by what its requests in flight use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MINUTE = 60.0
DAY = 86400.0


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's limits; None means no such limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    max_concurrent: int | None = None

    @property
    def any(self) -> bool:
        return any(
            value is not None
            for value in (
                self.requests_per_minute,
                self.tokens_per_minute,
                self.tokens_per_day,
                self.max_concurrent,
            )
        )

    @property
    def counts_tokens(self) -> bool:
        return self.tokens_per_minute is not None or self.tokens_per_day is not None


@dataclass(frozen=True, slots=True)
class Window:
    """What one limit's state says at `now`: the numbers OpenAI's `x-ratelimit-*` headers carry."""

    limit: int
    remaining: int  # whole units that would still be admitted now
    reset_seconds: float  # until the allowance is whole again
    retry_after_seconds: float  # until one more unit fits (0 when it fits now)


def interval(limit: int, window: float) -> float:
    """Seconds one unit holds the allowance: the window spread over the limit."""
    return window / limit


def tolerance(step: float, now: float) -> float:
    """How far apart two moments may be and still count as one.

    A TAT is a sum of float intervals and drifts by an ulp per addition (~1e-16 of the clock's
    value); without a tolerance a TAT a few 1e-11 s off would make a whole unit look spent.
    1 µs plus 1e-12 of the clock covers bursts of 10,000 units, and never more than half a
    unit: the limit stays exact to the unit.
    """
    return min(step / 2, 1e-6 + abs(now) * 1e-12)


def window_state(tat: float, now: float, limit: int, window: float) -> Window:
    """The allowance at `now` of a limit whose theoretical arrival time is `tat`.

    `remaining` is how many `admit`s would succeed now; `retry_after_seconds` is when the next
    one does (they share `tolerance`).
    """
    step = interval(limit, window)
    slack = tolerance(step, now)
    used = max(0.0, tat - now)  # seconds of allowance spent and not yet freed
    remaining = max(0, min(limit, math.floor((window - used + slack) / step)))
    retry_after = 0.0 if remaining >= 1 else used + step - window - slack
    return Window(limit, remaining, used, max(0.0, retry_after))


def admit(tat: float, now: float, limit: int, window: float, cost: int = 1) -> tuple[bool, float]:
    """Whether `cost` more units fit now, and the TAT afterwards (unchanged if refused).

    Admitted while the TAT, pushed by the cost, stays within one window of `now`.
    """
    step = interval(limit, window)
    pushed = max(tat, now) + cost * step
    if pushed - now > window + tolerance(step, now):
        return False, tat
    return True, pushed


def at_or_over(tat: float, now: float, limit: int, window: float) -> bool:
    """Whether a post-paid limit (tokens) has no allowance left at `now`."""
    return tat - now >= window - tolerance(interval(limit, window), now)


def charge(tat: float, now: float, limit: int, window: float, cost: int) -> float:
    """The TAT after `cost` units are paid whatever is left (post-paid tokens may overshoot)."""
    return max(tat, now) + cost * interval(limit, window)


def post_paid_retry_after(tat: float, now: float, limit: int, window: float) -> float:
    """Seconds until a post-paid limit at or over its allowance has some allowance again (the
    moment `at_or_over` turns false, give or take `tolerance`)."""
    slack = tolerance(interval(limit, window), now)
    return max(0.0, tat - now - window + 2 * slack)


def retry_after_header(seconds: float) -> str:
    """`retry-after` in whole seconds, at least 1 (RFC 9110 §10.2.3)."""
    return str(max(1, math.ceil(seconds - 1e-9)))


def reset_header(seconds: float) -> str:
    """OpenAI's `x-ratelimit-reset-*` format (Go's durations): `20ms`, `1.5s`, `6m0s`, `1h2m3s`.

    Rounded up (a client waiting that long finds the allowance back), in milliseconds under a
    minute and whole seconds above; never `60s` nor `1m60s`.
    """
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000 - 1e-6))}ms"
    milliseconds = math.ceil(seconds * 1000 - 1e-6)
    if milliseconds < 60_000:
        return f"{milliseconds / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    hours, rest = divmod(math.ceil(milliseconds / 1000 - 1e-9), 3600)
    minutes, whole_seconds = divmod(rest, 60)
    return f"{hours}h{minutes}m{whole_seconds}s" if hours else f"{minutes}m{whole_seconds}s"
