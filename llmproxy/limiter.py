"""Per-key limits enforced (DESIGN §11): the in-process store, the Redis store, and the 429.

Both stores compute what `limits.py` computes. A check is made before forwarding: refused if
the key is at or over a token limit, if one more request would not fit its requests per
minute, or if it has `max_concurrent` requests in flight; otherwise the request is paid and
its concurrency slot taken, all or nothing. When the answer is over, the slot is given back
and the tokens it used are paid (post-paid: a key may overshoot by what its requests in
flight use).

The Redis store does the same in one Lua script per check and one per release (none when the
key has neither a concurrency nor a token limit), over llmproxy's own pipelined client
(`redis_client.py`: ~16 µs of CPU per call where redis-py's asyncio client took ~70), with the time
of the Redis server (replicas agree on it), keys namespaced under `llmproxy:limits:` that
expire. Every call has its own timeout; when Redis is slow or down the request passes
(`redis_failure = "open"`, counted in `llmproxy_limiter_errors_total`, one warning a minute)
or is refused with 503 (`"closed"`), and counting resumes when Redis answers again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmproxy.access import AccessKey
from llmproxy.descriptors import should_warn
from llmproxy.errors import ProxyError
from llmproxy.limits import (
    DAY,
    MINUTE,
    KeyLimits,
    Window,
    admit,
    at_or_over,
    charge,
    post_paid_retry_after,
    reset_header,
    retry_after_header,
    window_state,
)
from llmproxy.redis_client import RedisClient, RedisError, encode_bulk, encode_command

logger = logging.getLogger("llmproxy")

LIMITER_UNAVAILABLE = ProxyError(
    503,
    "limiter_unavailable",
    "The rate limiter's store is unavailable and the proxy is set to refuse meanwhile.",
    "proxy_error",
)
# A request's concurrency slot in Redis outlives a replica that died holding it by this long.
CONCURRENCY_LEASE_SECONDS = 900.0
_WARNING_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class LimitRefusal:
    """A request over one of its key's limits: the 429 to answer."""

    limit: str  # requests_per_minute, tokens_per_minute, tokens_per_day, max_concurrent
    kind: str  # "requests" or "tokens": OpenAI's error type for rate limits
    value: int  # the limit's value
    retry_after: float  # seconds
    headers: tuple[tuple[bytes, bytes], ...]

    def error(self) -> ProxyError:
        what = {
            "requests_per_minute": f"{self.value} requests per minute",
            "tokens_per_minute": f"{self.value} tokens per minute",
            "tokens_per_day": f"{self.value} tokens per day",
            "max_concurrent": f"{self.value} concurrent requests",
        }[self.limit]
        return ProxyError(
            429,
            "rate_limit_exceeded",
            f"Rate limit reached for this key: {self.limit} is {what}. "
            f"Try again in {retry_after_header(self.retry_after)} s.",
            self.kind,
        )


def refusal(
    limit: str, value: int, retry_after: float, limits: KeyLimits, windows: _Windows
) -> LimitRefusal:
    """The 429 for `limit`, with OpenAI's `x-ratelimit-*` headers of the key's limits."""
    kind = "tokens" if limit.startswith("tokens") else "requests"
    headers: list[tuple[bytes, bytes]] = [
        (b"retry-after", retry_after_header(retry_after).encode())
    ]
    # The `-tokens` headers describe one window: the day's when it is the day that refused
    # (the minute's could show tokens remaining on a tokens 429), else the minute's.
    tokens = (
        windows.tokens_day
        if limit == "tokens_per_day" and windows.tokens_day is not None
        else windows.tokens_minute or windows.tokens_day
    )
    requests = windows.requests
    if requests is not None:
        headers += _window_headers(b"requests", requests)
    if tokens is not None:
        headers += _window_headers(b"tokens", tokens)
    return LimitRefusal(limit, kind, value, retry_after, tuple(headers))


def _window_headers(kind: bytes, window: Window) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-ratelimit-limit-" + kind, str(window.limit).encode()),
        (b"x-ratelimit-remaining-" + kind, str(window.remaining).encode()),
        (b"x-ratelimit-reset-" + kind, reset_header(window.reset_seconds).encode()),
    ]


@dataclass(slots=True)
class _Windows:
    requests: Window | None = None
    tokens_minute: Window | None = None
    tokens_day: Window | None = None


def decide(
    limits: KeyLimits,
    tats: tuple[float, float, float],
    in_flight: int,
    now: float,
) -> tuple[LimitRefusal | None, float]:
    """Whether a request of a key with these limits and this state may go; the new requests
    TAT if it may (pure: the in-process store and the tests use it; the Redis script is the
    same arithmetic)."""
    requests_tat, minute_tat, day_tat = tats
    windows = _Windows(
        window_state(requests_tat, now, limits.requests_per_minute, MINUTE)
        if limits.requests_per_minute
        else None,
        window_state(minute_tat, now, limits.tokens_per_minute, MINUTE)
        if limits.tokens_per_minute
        else None,
        window_state(day_tat, now, limits.tokens_per_day, DAY) if limits.tokens_per_day else None,
    )
    per_minute, per_day = limits.tokens_per_minute, limits.tokens_per_day
    if per_minute and at_or_over(minute_tat, now, per_minute, MINUTE):
        wait = post_paid_retry_after(minute_tat, now, per_minute, MINUTE)
        return refusal("tokens_per_minute", per_minute, wait, limits, windows), 0.0
    if per_day and at_or_over(day_tat, now, per_day, DAY):
        wait = post_paid_retry_after(day_tat, now, per_day, DAY)
        return refusal("tokens_per_day", per_day, wait, limits, windows), 0.0
    new_tat = requests_tat
    if limits.requests_per_minute:
        admitted, new_tat = admit(requests_tat, now, limits.requests_per_minute, MINUTE)
        if not admitted:
            assert windows.requests is not None
            wait = windows.requests.retry_after_seconds
            return refusal(
                "requests_per_minute", limits.requests_per_minute, wait, limits, windows
            ), 0.0
    if limits.max_concurrent is not None and in_flight >= limits.max_concurrent:
        # No time frees a slot: the client may try again in a second.
        return refusal("max_concurrent", limits.max_concurrent, 1.0, limits, windows), 0.0
    return None, new_tat


@dataclass(slots=True)
class _KeyState:
    requests_tat: float = 0.0
    minute_tat: float = 0.0
    day_tat: float = 0.0
    in_flight: int = 0


class MemoryLimiter:
    """The limits of one process: a dict of key states, checked and updated synchronously."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, _KeyState] = {}

    def check(self, key: AccessKey, request_id: str) -> LimitRefusal | None:
        state = self._states.get(key.name)
        if state is None:
            state = self._states[key.name] = _KeyState()
        limits = key.limits
        refused, new_tat = decide(
            limits,
            (state.requests_tat, state.minute_tat, state.day_tat),
            state.in_flight,
            self._clock(),
        )
        if refused is not None:
            return refused
        state.requests_tat = new_tat
        if limits.max_concurrent is not None:
            state.in_flight += 1
        return None

    def release(self, key: AccessKey, request_id: str, tokens: int) -> None:
        state = self._states[key.name]
        limits = key.limits
        if limits.max_concurrent is not None:
            state.in_flight -= 1
        if tokens:
            now = self._clock()
            if limits.tokens_per_minute:
                state.minute_tat = charge(
                    state.minute_tat, now, limits.tokens_per_minute, MINUTE, tokens
                )
            if limits.tokens_per_day:
                state.day_tat = charge(state.day_tat, now, limits.tokens_per_day, DAY, tokens)


# KEYS: requests TAT, tokens-per-minute TAT, tokens-per-day TAT, the in-flight sorted set.
# ARGV: requests_per_minute, tokens_per_minute, tokens_per_day, max_concurrent (0: none),
#       request id, lease seconds.
# Returns {verdict, now, requests TAT, minute TAT, day TAT, in flight}: verdict "ok" or the
# limit refused; the caller computes the 429's numbers from the same state with limits.py.
_CHECK_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
-- Times are stored with all 17 digits: Lua's tostring keeps 14, a tenth of a millisecond at
-- today's clock, and the rounding of each stored TAT added up to a burst short of the limit
-- (899 of 900 requests at once).
local function exact(x) return string.format('%.17g', x) end
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local tpd, maxc = tonumber(ARGV[3]), tonumber(ARGV[4])
local rtat = tonumber(redis.call('GET', KEYS[1]) or '0')
local mtat = tonumber(redis.call('GET', KEYS[2]) or '0')
local dtat = tonumber(redis.call('GET', KEYS[3]) or '0')
local flight = 0
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  flight = redis.call('ZCARD', KEYS[4])
end
local function answer(verdict)
  return {verdict, exact(now), exact(rtat), exact(mtat), exact(dtat), flight}
end
-- limits.tolerance: 1 µs plus 1e-12 of the clock, at most half a unit.
local function slack(step) return math.min(step / 2, 1e-6 + math.abs(now) * 1e-12) end
if tpm > 0 and mtat - now >= 60 - slack(60 / tpm) then return answer('tokens_per_minute') end
if tpd > 0 and dtat - now >= 86400 - slack(86400 / tpd) then return answer('tokens_per_day') end
local pushed = rtat
if rpm > 0 then
  pushed = math.max(rtat, now) + 60 / rpm
  if pushed - now > 60 + slack(60 / rpm) then return answer('requests_per_minute') end
end
if maxc > 0 and flight >= maxc then return answer('max_concurrent') end
if rpm > 0 then
  redis.call('SET', KEYS[1], exact(pushed), 'PX', math.ceil((pushed - now) * 1000) + 1000)
end
if maxc > 0 then
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), ARGV[5])
  redis.call('PEXPIRE', KEYS[4], math.ceil(tonumber(ARGV[6]) * 1000))
end
return answer('ok')
"""

# KEYS: tokens-per-minute TAT, tokens-per-day TAT, the in-flight sorted set.
# ARGV: tokens_per_minute, tokens_per_day, tokens used, request id.
_RELEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function exact(x) return string.format('%.17g', x) end  -- as in the check script
local tpm, tpd, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function pay(key, limit, window)
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now) + cost * window / limit
  redis.call('SET', key, exact(tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
end
if cost > 0 and tpm > 0 then pay(KEYS[1], tpm, 60) end
if cost > 0 and tpd > 0 then pay(KEYS[2], tpd, 86400) end
redis.call('ZREM', KEYS[3], ARGV[4])
return 1
"""


class RedisLimiter:
    """The limits of every worker and replica that share one Redis server."""

    def __init__(self, url: str, timeout: float, fail_closed: bool) -> None:
        self._redis = RedisClient(url)
        self._timeout = timeout
        self._fail_closed = fail_closed
        self._check_commands: dict[str, tuple[bytes, bytes]] = {}
        self._warned_at: float | None = None  # when the last warning was logged
        self._releases: set[asyncio.Task[None]] = set()

    async def check(self, key: AccessKey, request_id: str) -> LimitRefusal | ProxyError | None:
        limits = key.limits
        try:
            async with asyncio.timeout(self._timeout):
                # The command is the same for every request of a key but the slot id: its
                # encoding is made once per key (it is most of the Python work of a call).
                before, after = self._check_commands.get(key.name) or self._check_command(key)
                answer: Any = await self._redis.call(before + encode_bulk(request_id) + after)
                if isinstance(answer, RedisError) and str(answer).startswith("NOSCRIPT"):
                    answer = await self._redis.evalsha(
                        _CHECK_SHA, _CHECK_SCRIPT, *self._check_arguments(key, request_id)
                    )
                if isinstance(answer, RedisError):
                    raise answer
        except Exception as error:  # timeouts, connection errors, a Redis that is not Redis
            self._failed(error)
            return LIMITER_UNAVAILABLE if self._fail_closed else None
        verdict = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
        if verdict == "ok":
            return None
        now, rtat, mtat, dtat = (float(value) for value in answer[1:5])
        # The same state through the same arithmetic gives the same verdict and its numbers.
        refused, _ = decide(limits, (rtat, mtat, dtat), int(answer[5]), now)
        if refused is None:  # only a float rounding apart: refuse as Redis did, wait a second
            value = getattr(limits, verdict)
            return refusal(verdict, value, 1.0, limits, _Windows())
        return refused

    def _check_arguments(
        self, key: AccessKey, slot: str
    ) -> tuple[list[str], list[str | int | float]]:
        limits = key.limits
        return _redis_keys(key.name), [
            limits.requests_per_minute or 0,
            limits.tokens_per_minute or 0,
            limits.tokens_per_day or 0,
            limits.max_concurrent or 0,
            slot,
            CONCURRENCY_LEASE_SECONDS,
        ]

    def _check_command(self, key: AccessKey) -> tuple[bytes, bytes]:
        """`EVALSHA` of the check script for `key`, split where the slot id goes."""
        marker = "\x00slot\x00"
        keys, arguments = self._check_arguments(key, marker)
        command = encode_command("EVALSHA", _CHECK_SHA, len(keys), *keys, *arguments)
        before, after = command.split(encode_bulk(marker))
        self._check_commands[key.name] = (before, after)
        return before, after

    def release(self, key: AccessKey, request_id: str, tokens: int) -> None:
        """Give the slot back and pay the tokens, in a task of its own: the answer is over.

        Nothing to do for a key with neither a concurrency nor a token limit: no round trip.
        """
        limits = key.limits
        if limits.max_concurrent is None and not limits.counts_tokens:
            return
        task = asyncio.get_running_loop().create_task(self._pay(key, request_id, tokens))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _pay(self, key: AccessKey, request_id: str, tokens: int) -> None:
        limits = key.limits
        _, minute, day, in_flight = _redis_keys(key.name)
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.evalsha(
                    _RELEASE_SHA,
                    _RELEASE_SCRIPT,
                    [minute, day, in_flight],
                    [limits.tokens_per_minute or 0, limits.tokens_per_day or 0, tokens, request_id],
                )
        except Exception as error:
            self._failed(error)

    def _failed(self, error: Exception) -> None:
        from llmproxy import metrics

        metrics.LIMITER_ERRORS.inc()
        now = time.monotonic()
        if should_warn(self._warned_at, now, _WARNING_INTERVAL):
            self._warned_at = now
            action = "refusing requests (503)" if self._fail_closed else "letting requests pass"
            logger.warning(
                "the rate limiter's Redis failed (%s); %s until it answers again "
                "(llmproxy_limiter_errors_total counts each failure)",
                type(error).__name__,
                action,
            )

    async def close(self) -> None:
        if self._releases:
            await asyncio.wait(self._releases, timeout=self._timeout * 2)
        await self._redis.close()


_CHECK_SHA = hashlib.sha1(_CHECK_SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis's script id
_RELEASE_SHA = hashlib.sha1(_RELEASE_SCRIPT.encode()).hexdigest()  # noqa: S324


def _redis_keys(name: str) -> list[str]:
    """The Redis keys of one access key's state (by name: names are unique, keys secret)."""
    prefix = f"llmproxy:limits:{name}:"
    return [prefix + "rpm", prefix + "tpm", prefix + "tpd", prefix + "inflight"]
