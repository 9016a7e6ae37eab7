"""Script parsing and the scenario table, as pure functions."""

from __future__ import annotations

import re
from typing import Any

import pytest

from fake_upstream.scripts import (
    _FIELD_PARSERS,
    FIELD_NAMES,
    SCENARIOS,
    Script,
    ScriptError,
    ToolCall,
    parse_queue_request,
    parse_script,
    script_from_headers,
)
from fake_upstream.wire import merge_headers


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenario_is_a_valid_script(name: str) -> None:
    assert isinstance(parse_script(SCENARIOS[name]), Script)


def test_required_scenarios_exist() -> None:
    required = {
        "echo",
        "rate_limited",
        "server_error",
        "text_500",
        "slow_stream",
        "reset_mid_stream",
        "stall_mid_stream",
        "error_in_stream",
    }
    assert required <= set(SCENARIOS)


def test_full_script_parses() -> None:
    script = parse_script(
        {
            "status": 201,
            "body": {"a": 1},
            "headers": [["x-a", "1"], ["X-A", "2"]],
            "chunks": ["a", "b"],
            "delay_before_headers": 0,
            "delay_per_chunk": 0.5,
            "stream": True,
            "ending": "reset",
            "after_chunks": 1,
            "id": "chatcmpl-1",
            "created": 7,
            "model": "m",
            "finish_reason": "length",
            "error": {"message": "boom"},
            "echo": False,
        }
    )
    assert script.headers == (("x-a", "1"), ("X-A", "2"))
    assert script.chunks == ("a", "b")
    assert script.delay_per_chunk == 0.5
    assert script.as_json()["after_chunks"] == 1


BAD_SCRIPTS: list[tuple[Any, str]] = [
    ({"nope": 1}, "unknown field 'nope'"),
    ({"status": "429"}, "field 'status' must be an integer"),
    ({"status": True}, "field 'status' must be an integer"),
    ({"status": 99}, "between 200 and 599"),
    ({"body": 3}, "field 'body' must be a string"),
    ({"headers": "x"}, "field 'headers' must be an object or a list"),
    ({"headers": [["only-name"]]}, "entry 0 must be a pair of strings"),
    ({"headers": {"bad name": "x"}}, "'bad name' is not a valid header name"),
    ({"headers": {"x-a": "1\r\nx-b: 2"}}, "contains CR, LF or NUL"),
    ({"chunks": "abc"}, "field 'chunks' must be a list of strings"),
    ({"chunks": ["a", 1]}, "field 'chunks' must be a list of strings"),
    ({"delay_per_chunk": -1}, "finite number of seconds >= 0"),
    ({"delay_before_headers": "1"}, "field 'delay_before_headers' must be a number"),
    ({"stream": "yes"}, "field 'stream' must be a boolean"),
    ({"ending": "explode"}, "field 'ending' must be one of done, close, reset"),
    ({"after_chunks": -1}, "field 'after_chunks' must be an integer >= 0"),
    ({"error": "boom"}, "field 'error' must be an object"),
    ({"error_shape": "square"}, "field 'error_shape' must be one of nested, flat"),
    ({"reasoning_tokens": -1}, "field 'reasoning_tokens' must be an integer >= 0"),
    ({"tool_calls": {"name": "f"}}, "field 'tool_calls' must be a list"),
    ({"tool_calls": ["f"]}, "field 'tool_calls[0]' must be an object"),
    ({"tool_calls": [{"arguments": "{}"}]}, "field 'tool_calls[0]': 'name' is required"),
    ({"tool_calls": [{"name": "f", "args": "{}"}]}, "unknown key 'args'"),
    (
        {"tool_calls": [{"name": "f", "arguments": {"a": 1}}]},
        "'tool_calls[0].arguments' must be a string",
    ),
    ({"tool_calls": [{"name": 3}]}, "field 'tool_calls[0].name' must be a string"),
    ([1], "a script must be a JSON object"),
]


@pytest.mark.parametrize(("script", "message"), BAD_SCRIPTS)
def test_bad_scripts_are_refused_with_a_reason(script: Any, message: str) -> None:
    with pytest.raises(ScriptError, match=re.escape(message)):
        parse_script(script)


def test_the_parser_table_covers_every_field() -> None:
    assert set(_FIELD_PARSERS) == set(FIELD_NAMES)


def test_new_fields_parse() -> None:
    script = parse_script(
        {
            "tool_calls": [
                {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                {"name": "noop", "id": "call_7"},
            ],
            "reasoning_tokens": 12,
            "error_shape": "flat",
            "ending": "incomplete",
        }
    )
    assert script.tool_calls == (
        ToolCall("get_weather", '{"city":"Paris"}'),
        ToolCall("noop", "{}", "call_7"),
    )
    assert (script.reasoning_tokens, script.error_shape, script.ending) == (
        12,
        "flat",
        "incomplete",
    )
    assert parse_script({"ending": "failed"}).ending == "failed"


def test_header_script_overrides_scenario() -> None:
    script = script_from_headers("rate_limited", '{"headers": {"retry-after": "7"}}')
    assert script is not None
    assert script.status == 429
    assert script.headers == (("retry-after", "7"),)


def test_no_headers_means_no_script() -> None:
    assert script_from_headers(None, None) is None


@pytest.mark.parametrize(
    ("scenario", "inline", "message"),
    [
        ("nope", None, "x-fake-scenario: unknown scenario 'nope'; known scenarios: echo"),
        (None, "{not json", "x-fake-script: not valid JSON"),
        (None, "[]", "x-fake-script: a script must be a JSON object"),
        (None, '{"stauts": 429}', "x-fake-script: unknown field 'stauts'"),
    ],
)
def test_header_errors_name_the_header(
    scenario: str | None, inline: str | None, message: str
) -> None:
    with pytest.raises(ScriptError) as caught:
        script_from_headers(scenario, inline)
    assert str(caught.value).startswith(message)


def test_queue_request_names_the_bad_entry() -> None:
    with pytest.raises(ScriptError, match=r"scripts\[2\]: unknown scenario 'nope'"):
        parse_queue_request({"scripts": [{}, "rate_limited", "nope"]})
    with pytest.raises(ScriptError, match="must be a JSON object"):
        parse_queue_request({"scripts": [], "extra": 1})
    assert len(parse_queue_request({"scripts": ["server_error", {"status": 503}]})) == 2


def test_scripted_headers_replace_defaults_case_insensitively() -> None:
    merged = merge_headers([("x-request-id", "a"), ("x-b", "1")], [("X-Request-Id", "z")])
    assert merged == [("x-b", "1"), ("X-Request-Id", "z")]
