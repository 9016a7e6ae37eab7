"""Scripts: what one request's response should look like, parsed and validated as pure functions.

A script is a JSON object. It reaches the server in the `x-fake-script` request header, by name
through `x-fake-scenario` (a row of `SCENARIOS`), or from the queue (`POST /_fake/queue`).
Every field is optional; an empty script gives the default, well-behaved OpenAI reply.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal, cast, get_args

Ending = Literal[
    "done",
    "close",
    "reset",
    "stall",
    "error_event",
    "malformed_json",
    "crlf",
    "split_event",
    "ping",
    "failed",
    "incomplete",
]
ENDINGS: Final[tuple[str, ...]] = get_args(Ending)

ErrorShape = Literal["nested", "flat"]
ERROR_SHAPES: Final[tuple[str, ...]] = get_args(ErrorShape)
"""How an `error_event` looks on a Responses stream: `nested` as production sends it
(`{"type": "error", "error": {...}}`), `flat` as the API reference documents it."""

# RFC 9110 §5.6.2 token characters; anything else in a header name makes uvicorn refuse the
# response with a 500, so a bad name is the script's fault and is reported as such.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# RFC 9110 §5.5: no CR, LF or NUL inside a field value (response splitting).
_HEADER_VALUE = re.compile(r"^[^\r\n\x00]*$")


class ScriptError(ValueError):
    """A script, scenario name or queue request that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One scripted function call: `arguments` is the JSON text the model "wrote"."""

    name: str
    arguments: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Script:
    """One request's scripted response. Field docs are in the README's fake_upstream section."""

    status: int | None = None
    body: str | dict[str, Any] | list[Any] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    chunks: tuple[str, ...] | None = None
    delay_before_headers: float = 0.0
    delay_per_chunk: float = 0.0
    stream: bool | None = None
    ending: Ending = "done"
    after_chunks: int | None = None
    id: str | None = None
    created: int | None = None
    model: str | None = None
    finish_reason: str | None = None
    error: dict[str, Any] | None = None
    error_shape: ErrorShape = "nested"
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning_tokens: int = 0
    echo: bool = False
    close_code: int | None = None
    close_reason: str = ""
    _raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def as_json(self) -> dict[str, Any]:
        """The script as the JSON object it was parsed from (for the journal and `/_fake/queue`)."""
        return dict(self._raw)


FIELD_NAMES: Final[tuple[str, ...]] = tuple(f.name for f in fields(Script) if f.name != "_raw")


def type_name(value: object) -> str:
    """How an error message names the JSON type of `value` ('a string', 'an object', ...)."""
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _bad(name: str, expected: str, value: object) -> ScriptError:
    return ScriptError(f"field {name!r} must be {expected}, got {type_name(value)} {value!r}")


def _delay(name: str, value: object) -> float:
    # bool is an int subclass; `true` as a delay is a mistake, not one second.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, "a number of seconds", value)
    if not math.isfinite(value) or value < 0:
        raise _bad(name, "a finite number of seconds >= 0", value)
    return float(value)


def _int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "an integer", value)
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise _bad(name, f"an integer {bounds}", value)
    return value


def _str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise _bad(name, "a string", value)
    return value


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, "a boolean", value)
    return value


def parse_headers(value: object) -> tuple[tuple[str, str], ...]:
    """Accept `{"name": "value"}` or `[["name", "value"], ...]` (repeats kept, in order)."""
    if isinstance(value, Mapping):
        pairs: list[object] = [[k, v] for k, v in value.items()]
    elif isinstance(value, list):
        pairs = value
    else:
        raise _bad("headers", 'an object or a list of ["name", "value"] pairs', value)
    result: list[tuple[str, str]] = []
    for index, pair in enumerate(pairs):
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(part, str) for part in pair)
        ):
            raise ScriptError(
                f"field 'headers': entry {index} must be a pair of strings, got {pair!r}"
            )
        name, header_value = cast(list[str], pair)
        if not _HEADER_NAME.match(name):
            raise ScriptError(f"field 'headers': {name!r} is not a valid header name")
        if not _HEADER_VALUE.match(header_value):
            raise ScriptError(
                f"field 'headers': value of {name!r} contains CR, LF or NUL: {header_value!r}"
            )
        result.append((name, header_value))
    return tuple(result)


def _body(name: str, value: object) -> str | dict[str, Any] | list[Any]:
    if not isinstance(value, str | dict | list):
        raise _bad(name, "a string (sent raw) or a JSON object or list", value)
    return value


def _chunks(name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise _bad(name, "a list of strings", value)
    return tuple(value)


def _choice(choices: tuple[str, ...]) -> Callable[[str, object], Any]:
    def parse(name: str, value: object) -> Any:
        if value not in choices:
            raise ScriptError(f"field {name!r} must be one of {', '.join(choices)}; got {value!r}")
        return value

    return parse


def _error(name: str, value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(name, "an object (the OpenAI error object)", value)
    return dict(value)


def _tool_calls(name: str, value: object) -> tuple[ToolCall, ...]:
    if not isinstance(value, list):
        raise _bad(name, 'a list of {"name": ..., "arguments": ...} objects', value)
    calls = []
    for index, call in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(call, Mapping):
            raise _bad(where, 'an object {"name": ..., "arguments": ...}', call)
        unknown = sorted(set(call) - {"name", "arguments", "id"})
        if unknown:
            known = "known: name, arguments, id"
            raise ScriptError(f"field {where!r}: unknown key {unknown[0]!r}; {known}")
        if "name" not in call:
            raise ScriptError(f"field {where!r}: 'name' is required")
        arguments = call.get("arguments", "{}")
        if not isinstance(arguments, str):
            # Arguments are a JSON *string* on the wire; an object here is a likely slip.
            raise _bad(f"{where}.arguments", "a string (JSON text, as on the wire)", arguments)
        call_id = call.get("id")
        calls.append(
            ToolCall(
                name=_str(f"{where}.name", call["name"]),
                arguments=arguments,
                id=None if call_id is None else _str(f"{where}.id", call_id),
            )
        )
    return tuple(calls)


# Close codes a WebSocket endpoint may send (RFC 6455 §7.4): 1004-1006 and 1015 are reserved
# for the peers' own reports, and websockets refuses anything else below 3000.
_CLOSE_CODES: Final = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)})


def _close_code(name: str, value: object) -> int:
    code = _int(name, value, 1000, 4999)
    if code not in _CLOSE_CODES:
        raise _bad(name, "a close code a server may send (1000-1003, 1007-1014, 3000-4999)", value)
    return code


def _close_reason(name: str, value: object) -> str:
    reason = _str(name, value)
    if len(reason.encode()) > 123:  # a close frame's payload is at most 125 bytes
        raise ScriptError(f"field {name!r} must be at most 123 bytes of UTF-8, got {reason!r}")
    return reason


# Field -> parser: the one validator for header scripts, the queue and fixture files. Every
# parser takes the field's name (for the message) and the JSON value, and returns the value
# the `Script` holds or raises `ScriptError`.
_FIELD_PARSERS: Final[Mapping[str, Callable[[str, object], Any]]] = {
    "status": lambda name, value: _int(name, value, 200, 599),
    "body": _body,
    "headers": lambda _name, value: parse_headers(value),
    "chunks": _chunks,
    "delay_before_headers": _delay,
    "delay_per_chunk": _delay,
    "stream": _bool,
    "ending": _choice(ENDINGS),
    "after_chunks": lambda name, value: _int(name, value, 0),
    "id": _str,
    "created": lambda name, value: _int(name, value, 0),
    "model": _str,
    "finish_reason": _str,
    "error": _error,
    "error_shape": _choice(ERROR_SHAPES),
    "tool_calls": _tool_calls,
    "reasoning_tokens": lambda name, value: _int(name, value, 0),
    "echo": _bool,
    "close_code": _close_code,
    "close_reason": _close_reason,
}


def parse_script(obj: object) -> Script:
    """Validate a decoded JSON script; raise `ScriptError` naming the first problem found."""
    if not isinstance(obj, Mapping):
        raise ScriptError(f"a script must be a JSON object, got {type_name(obj)} {obj!r}")
    unknown = sorted(set(obj) - set(FIELD_NAMES))
    if unknown:
        raise ScriptError(f"unknown field {unknown[0]!r}; known fields: {', '.join(FIELD_NAMES)}")
    values = {name: _FIELD_PARSERS[name](name, value) for name, value in obj.items()}
    return Script(**values, _raw=dict(obj))


# Named scenarios: plain data, validated by the same parser as any other script (see
# tests/fake_upstream/test_scripts.py). Header names/values follow real OpenAI responses.
SCENARIOS: Final[Mapping[str, Mapping[str, Any]]] = {
    "echo": {"echo": True},
    "rate_limited": {
        "status": 429,
        "headers": {
            "retry-after": "1",
            "x-ratelimit-limit-requests": "3",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1s",
        },
        "error": {
            "message": "Rate limit reached for gpt-4o-mini in organization org-fake on requests "
            "per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 1s.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        },
    },
    "insufficient_quota": {
        "status": 429,
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing "
            "details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        },
    },
    "server_error": {"status": 500},
    "service_unavailable": {"status": 503},
    "text_500": {
        "status": 500,
        "body": "Internal Server Error",
        "headers": {"content-type": "text/plain; charset=utf-8"},
    },
    "slow_headers": {"delay_before_headers": 2.0},
    "slow_stream": {"stream": True, "delay_per_chunk": 0.3},
    "reset_mid_stream": {"stream": True, "ending": "reset", "after_chunks": 2},
    "stall_mid_stream": {"stream": True, "ending": "stall", "after_chunks": 2},
    "error_in_stream": {"stream": True, "ending": "error_event", "after_chunks": 2},
    "close_without_done": {"stream": True, "ending": "close"},
    "malformed_json": {"stream": True, "ending": "malformed_json", "after_chunks": 2},
    "crlf_stream": {"stream": True, "ending": "crlf"},
    "split_event": {"stream": True, "ending": "split_event"},
    "ping_stream": {"stream": True, "ending": "ping"},
}


def scenario(name: str) -> Mapping[str, Any]:
    """The script object of a named scenario."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ScriptError(
            f"unknown scenario {name!r}; known scenarios: {', '.join(SCENARIOS)}"
        ) from None


def script_from_headers(scenario_name: str | None, script_json: str | None) -> Script | None:
    """The script a request carries in its headers, or None when it carries none.

    With both headers, the inline script's fields override the scenario's, so a test can say
    `x-fake-scenario: rate_limited` plus `x-fake-script: {"headers": {"retry-after": "7"}}`.
    """
    if scenario_name is None and script_json is None:
        return None
    merged: dict[str, Any] = {}
    if scenario_name is not None:
        try:
            merged.update(scenario(scenario_name.strip()))
        except ScriptError as exc:
            raise ScriptError(f"x-fake-scenario: {exc}") from None
    if script_json is not None:
        try:
            inline = json.loads(script_json)
        except json.JSONDecodeError as exc:
            raise ScriptError(f"x-fake-script: not valid JSON: {exc}") from None
        if not isinstance(inline, Mapping):
            got = f"{type_name(inline)} {inline!r}"
            raise ScriptError(f"x-fake-script: a script must be a JSON object, got {got}")
        merged.update(inline)
    try:
        return parse_script(merged)
    except ScriptError as exc:
        raise ScriptError(f"x-fake-script: {exc}") from None


def parse_queue_entry(entry: object) -> Script:
    """A queued script: a script object, or a scenario name as a string."""
    if isinstance(entry, str):
        return parse_script(scenario(entry))
    return parse_script(entry)


def parse_queue_request(obj: object) -> list[Script]:
    """Validate a `POST /_fake/queue` body `{"scripts": [...]}`; all-or-nothing."""
    if not isinstance(obj, Mapping) or set(obj) != {"scripts"}:
        raise ScriptError('the body must be a JSON object {"scripts": [script, ...]}')
    entries = obj["scripts"]
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        raise ScriptError(f"'scripts' must be a list, got {type_name(entries)} {entries!r}")
    scripts = []
    for index, entry in enumerate(entries):
        try:
            scripts.append(parse_queue_entry(entry))
        except ScriptError as exc:
            raise ScriptError(f"scripts[{index}]: {exc}") from None
    return scripts
