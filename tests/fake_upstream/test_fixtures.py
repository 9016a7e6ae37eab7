"""Fixtures on disk: parsing, matching (pure), the rules' uses, strict mode, and a fixture file
driving the CLI under the official `openai` SDK."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fake_upstream import FakeUpstreamServer
from fake_upstream.fixtures import (
    FixtureError,
    FixtureMatch,
    FixtureSet,
    NoFixtureMatchedError,
    RequestFacts,
    glob_matches,
    load_rules,
    parse_rules,
    request_facts,
    rule_matches,
)
from tests.fake_upstream.cli_process import run_fake_upstream, running_fake_upstream


def write_rules(path: Path, rules: list[Any]) -> Path:
    path.write_text(json.dumps(rules), encoding="utf-8")
    return path


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


# --- what a request looks like to the rules ---------------------------------------------------

FACTS_CASES: list[tuple[str, dict[str, Any], str | None, tuple[str, ...]]] = [
    (
        "chat, last user message wins over later assistant turns",
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "second question"},
                {"role": "assistant", "content": "answer"},
            ],
        },
        "second question",
        (),
    ),
    (
        "chat content parts, chat tools",
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "look at this"}]}],
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "parameters": {}}},
                {"type": "function", "function": {"name": "get_time"}},
            ],
        },
        "look at this",
        ("get_weather", "get_time"),
    ),
    (
        "Responses input as a string, Responses tools",
        {
            "model": "gpt-4.1",
            "input": "what is the weather",
            "tools": [{"type": "function", "name": "get_weather"}, {"type": "web_search"}],
        },
        "what is the weather",
        ("get_weather",),
    ),
    (
        "Responses input items, skipping a trailing tool result",
        {
            "input": [
                {"role": "developer", "content": "be brief"},
                {"type": "message", "role": "user", "content": "earlier"},
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "latest"}],
                },
                {"type": "function_call_output", "call_id": "call_1", "output": "{}"},
            ]
        },
        "latest",
        (),
    ),
    ("legacy completions prompt", {"prompt": "Say this"}, "Say this", ()),
    ("no user message", {"messages": [{"role": "system", "content": "x"}]}, None, ()),
]


@pytest.mark.parametrize(
    ("request_body", "message", "tools"),
    [case[1:] for case in FACTS_CASES],
    ids=[case[0] for case in FACTS_CASES],
)
def test_request_facts(
    request_body: dict[str, Any], message: str | None, tools: tuple[str, ...]
) -> None:
    facts = request_facts("POST", "/v1/x", [("X-Tenant", "acme")], body(request_body))
    assert facts.last_user_message == message
    assert facts.tools == tools
    assert facts.model == request_body.get("model")
    assert facts.headers == (("x-tenant", "acme"),)


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_a_body_that_is_no_json_object_gives_no_model_message_or_tools(raw: bytes) -> None:
    facts = request_facts("POST", "/v1/chat/completions", [], raw)
    assert (facts.model, facts.last_user_message, facts.tools) == (None, None, ())


text = st.text(max_size=12)


@given(prefix=text, middle=text, suffix=text)
def test_star_matches_any_run_of_characters(prefix: str, middle: str, suffix: str) -> None:
    pattern = prefix.replace("*", "") + "*" + suffix.replace("*", "")
    assert glob_matches(pattern, prefix.replace("*", "") + middle + suffix.replace("*", ""))


@given(pattern=text.filter(lambda p: "*" not in p), other=text)
def test_a_pattern_without_star_matches_only_itself(pattern: str, other: str) -> None:
    # Regex and fnmatch metacharacters (`.`, `?`, `[`) are literal.
    assert glob_matches(pattern, pattern)
    assert glob_matches(pattern, other) == (pattern == other)


MATCH_CASES: list[tuple[FixtureMatch, bool]] = [
    (FixtureMatch(), True),
    (FixtureMatch(path="/v1/chat/completions"), True),
    (FixtureMatch(path="/v1/*"), True),
    (FixtureMatch(path="/v1/responses"), False),
    (FixtureMatch(model="gpt-4o-mini"), True),
    (FixtureMatch(model="gpt-4o*"), True),
    (FixtureMatch(model="gpt-4o"), False),
    (FixtureMatch(model="*-mini"), True),
    (FixtureMatch(contains="weather in"), True),
    (FixtureMatch(contains="Weather in"), False),
    (FixtureMatch(tool="get_weather"), True),
    (FixtureMatch(tool="get"), False),
    (FixtureMatch(headers=(("x-tenant", "acme"),)), True),
    (FixtureMatch(headers=(("x-tenant", "ac*"),)), True),
    (FixtureMatch(headers=(("x-tenant", "other"),)), False),
    (FixtureMatch(headers=(("x-absent", "*"),)), False),
    (FixtureMatch(path="/v1/*", model="gpt-4o*", contains="weather", tool="get_weather"), True),
    (FixtureMatch(path="/v1/*", model="gpt-4o*", contains="weather", tool="nope"), False),
]
FACTS = RequestFacts(
    method="POST",
    path="/v1/chat/completions",
    headers=(("x-tenant", "acme"), ("x-tenant", "second")),
    model="gpt-4o-mini",
    last_user_message="what is the weather in Paris",
    tools=("get_weather",),
)


@pytest.mark.parametrize(("match", "expected"), MATCH_CASES)
def test_rule_matches(match: FixtureMatch, expected: bool) -> None:
    assert rule_matches(match, FACTS) is expected


def test_conditions_on_what_a_request_lacks_never_hold() -> None:
    bare = RequestFacts("POST", "/v1/chat/completions")
    assert not rule_matches(FixtureMatch(model="*"), bare)
    assert not rule_matches(FixtureMatch(contains=""), bare)
    assert rule_matches(FixtureMatch(path="*"), bare)


# --- parsing ----------------------------------------------------------------------------------

BAD_RULES: list[tuple[object, str]] = [
    ({"rules": []}, "a fixture file must hold a JSON list of rules, got an object"),
    (["hi"], "rule 0: a rule must be an object, got a string"),
    ([{}, {"name": "x", "mach": {}}], "rule 1 ('x'): unknown key 'mach'; known keys: name,"),
    ([{"name": 3}], "rule 0: 'name' must be a string, got an integer"),
    ([{"match": {"modle": "a"}}], "rule 0: match: unknown key 'modle'; known keys: path,"),
    ([{"match": {"model": 4}}], "rule 0: match: 'model' must be a string, got an integer"),
    ([{"match": {"headers": {"a": 1}}}], "rule 0: match: 'headers' must be an object"),
    ([{"match": []}], "rule 0: 'match' must be an object, got a list"),
    ([{"times": 0}], "rule 0: 'times' must be an integer >= 1, got an integer 0"),
    ([{"times": True}], "rule 0: 'times' must be an integer >= 1, got a boolean"),
    (
        [{"name": "s", "script": {"status": "429"}}],
        "rule 0 ('s'): script: field 'status' must be an integer",
    ),
    ([{"script": "nope"}], "rule 0: script: unknown scenario 'nope'"),
]


@pytest.mark.parametrize(("obj", "message"), BAD_RULES)
def test_bad_rules_name_the_file_and_the_rule(obj: object, message: str) -> None:
    with pytest.raises(FixtureError) as caught:
        parse_rules(obj, "f.json")
    assert str(caught.value).startswith(f"f.json: {message}"), str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_rule_needs_nothing_and_a_script_may_be_a_scenario_name() -> None:
    (catch_all, scenario) = parse_rules([{}, {"script": "rate_limited"}], "f.json", first_index=5)
    assert catch_all.match == FixtureMatch()
    assert catch_all.script.as_json() == {}
    assert (catch_all.label, scenario.label) == (5, 6)
    assert scenario.script.status == 429


def test_a_directory_loads_its_json_files_in_name_order(tmp_path: Path) -> None:
    write_rules(tmp_path / "b.json", [{"name": "b1"}])
    write_rules(tmp_path / "a.json", [{"name": "a1"}, {"name": "a2"}])
    (tmp_path / "notes.txt").write_text("not a fixture")
    rules = load_rules(tmp_path)
    assert [(rule.label, rule.index) for rule in rules] == [("a1", 0), ("a2", 1), ("b1", 2)]
    assert rules[2].source == str(tmp_path / "b.json")


def test_unreadable_fixture_paths_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(FixtureError, match=r"missing\.json: no such file or directory$"):
        load_rules(tmp_path / "missing.json")
    with pytest.raises(FixtureError, match=r"holds no \*\.json fixture files$"):
        load_rules(tmp_path)
    (tmp_path / "bad.json").write_text('[{"name": "x",}]')
    with pytest.raises(FixtureError, match=r"bad\.json: not valid JSON: Expecting"):
        load_rules(tmp_path / "bad.json")


# --- uses and strictness ---------------------------------------------------------------------


def chat(content: str, model: str = "gpt-4o-mini") -> bytes:
    return body({"model": model, "messages": [{"role": "user", "content": content}]})


def choose(fixtures: FixtureSet, content: str) -> str | int | None:
    rule = fixtures.choose("POST", "/v1/chat/completions", [], chat(content))
    return None if rule is None else rule.label


def test_the_first_matching_rule_with_uses_left_answers(tmp_path: Path) -> None:
    fixtures = FixtureSet()
    fixtures.load(
        write_rules(
            tmp_path / "f.json",
            [
                {"name": "twice", "match": {"contains": "hi"}, "times": 2},
                {"match": {"contains": "hi"}},
                {"name": "other", "match": {"contains": "bye"}, "times": 1},
            ],
        )
    )
    assert [choose(fixtures, "hi") for _ in range(4)] == ["twice", "twice", 1, 1]
    assert [choose(fixtures, "bye") for _ in range(2)] == ["other", None]


def test_strict_refuses_with_a_summary_of_the_request() -> None:
    fixtures = FixtureSet(strict=True)
    with pytest.raises(NoFixtureMatchedError) as caught:
        choose(fixtures, "x" * 100)
    message = str(caught.value)
    assert message.startswith("no fixture matched POST /v1/chat/completions, model 'gpt-4o-mini'")
    assert "last user message '" + "x" * 60 + "...'" in message
    assert message.endswith("tools: none (0 rules loaded, 0 used up)")


def test_a_bad_file_adds_no_rules(tmp_path: Path) -> None:
    fixtures = FixtureSet()
    write_rules(tmp_path / "a.json", [{"name": "good"}])
    write_rules(tmp_path / "b.json", [{"name": "bad", "times": -1}])
    with pytest.raises(FixtureError, match=r"b\.json: rule 0 \('bad'\): 'times'"):
        fixtures.load(tmp_path)
    assert choose(fixtures, "hi") is None


# --- through the server ----------------------------------------------------------------------


@pytest.fixture
def http(fake_upstream: FakeUpstreamServer) -> httpx.Client:
    with httpx.Client(base_url=fake_upstream.url, timeout=10) as client:
        yield client  # type: ignore[misc]


def test_header_scripts_and_the_queue_come_before_rules(
    tmp_path: Path, fake_upstream: FakeUpstreamServer, http: httpx.Client
) -> None:
    fake_upstream.load_fixtures(
        write_rules(tmp_path / "f.json", [{"name": "teapot", "script": {"status": 418}}])
    )
    fake_upstream.queue({"status": 503})
    request = {"model": "m", "messages": []}
    assert http.post("/v1/chat/completions", json=request).status_code == 503
    scripted = http.post(
        "/v1/chat/completions", json=request, headers={"x-fake-script": '{"status": 502}'}
    )
    assert scripted.status_code == 502
    assert http.post("/v1/chat/completions", json=request).status_code == 418
    assert [entry["fixture"] for entry in fake_upstream.journal()] == [None, None, "teapot"]


def test_responses_requests_match_on_input_and_tools(
    tmp_path: Path, fake_upstream: FakeUpstreamServer, http: httpx.Client
) -> None:
    fake_upstream.load_fixtures(
        write_rules(
            tmp_path / "f.json",
            [
                {"match": {"path": "/v1/responses", "tool": "get_weather"}, "script": {}},
                {"match": {"path": "/v1/responses", "contains": "Paris"}, "script": {}},
            ],
        ),
        strict=True,
    )
    tool = [{"type": "function", "name": "get_weather", "parameters": {}}]
    http.post("/v1/responses", json={"model": "gpt-4.1", "input": "hi", "tools": tool})
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Paris?"}]}]
    http.post("/v1/responses", json={"model": "gpt-4.1", "input": items})
    refused = http.post("/v1/responses", json={"model": "gpt-4.1", "input": "Rome?"})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "no_fixture_matched"
    assert [entry["fixture"] for entry in fake_upstream.journal()] == [0, 1, None]


pytest_plugins = ["pytester"]

INNER_TESTS = """
import httpx

def test_loads_strict_rules_and_cassettes(fake_upstream, tmp_path):
    rules = tmp_path / "f.json"
    rules.write_text('[{"match": {"model": "nothing-matches-this"}}]')
    fake_upstream.load_fixtures(rules, strict=True)
    assert httpx.get(fake_upstream.base_url + "/models").status_code == 400

def test_then_the_next_test_starts_without_them(fake_upstream, tmp_path):
    assert httpx.get(fake_upstream.base_url + "/models").status_code == 200
    fake_upstream.use_cassettes(tmp_path, "replay")
    assert httpx.get(fake_upstream.base_url + "/models").status_code == 404

def test_and_without_cassettes(fake_upstream):
    assert httpx.get(fake_upstream.base_url + "/models").status_code == 200
"""


def test_the_pytest_fixture_drops_rules_and_cassettes_between_tests(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(INNER_TESTS)
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly").assert_outcomes(
        passed=3
    )


# --- the CLI and the SDK ---------------------------------------------------------------------

SDK_RULES = [
    {
        "name": "weather",
        "match": {"path": "/v1/chat/completions", "tool": "get_weather"},
        "script": {"chunks": ["Sunny", " in Paris"]},
    },
    {
        "name": "first-hello",
        "match": {"model": "gpt-4o*", "contains": "hello"},
        "script": {"chunks": ["Hi", " once"]},
        "times": 1,
    },
    {"match": {"contains": "hello"}, "script": {"chunks": ["Hi again"]}},
    {"name": "acme", "match": {"headers": {"x-tenant": "acme"}}, "script": "rate_limited"},
    {
        "name": "responses-weather",
        "match": {"path": "/v1/responses", "tool": "get_weather", "contains": "Paris"},
        "script": {"chunks": ["Rain", " in Paris"]},
    },
]
WEATHER_TOOL: openai.types.chat.ChatCompletionToolParam = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


def say(content: str) -> list[openai.types.chat.ChatCompletionMessageParam]:
    return [{"role": "user", "content": content}]


def test_a_fixture_file_drives_the_cli_under_strict(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "fixtures.json", SDK_RULES)
    with (
        running_fake_upstream("--fixtures", str(rules), "--strict") as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0) as client,
    ):
        weather = client.chat.completions.create(
            model="gpt-4o-mini", messages=say("weather?"), tools=[WEATHER_TOOL]
        )
        assert weather.choices[0].message.content == "Sunny in Paris"
        with client.chat.completions.create(
            model="gpt-4o-mini", messages=say("hello there"), stream=True
        ) as stream:
            assert "".join(c.choices[0].delta.content or "" for c in stream) == "Hi once"
        again = client.chat.completions.create(model="gpt-4o", messages=say("hello"))
        assert again.choices[0].message.content == "Hi again"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(
                model="gpt-4o", messages=say("x"), extra_headers={"x-tenant": "acme"}
            )
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="gpt-3.5-turbo", messages=say("goodbye"))
        assert caught.value.code == "no_fixture_matched"
        assert "POST /v1/chat/completions, model 'gpt-3.5-turbo'" in caught.value.message
        assert "last user message 'goodbye'" in caught.value.message
        response = client.responses.create(
            model="gpt-4.1",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Paris?"}]}],
            tools=[{"type": "function", "name": "get_weather", "parameters": {}, "strict": False}],
        )
        assert response.output_text == "Rain in Paris"
        journal = httpx.get(f"{url}/_fake/journal", timeout=10).json()
    fixtures = ["weather", "first-hello", 2, "acme", None, "responses-weather"]
    assert [entry["fixture"] for entry in journal] == fixtures
    assert [entry["status"] for entry in journal] == [200, 200, 200, 429, 400, 200]


def test_a_bad_fixture_file_is_one_line_naming_the_file_and_rule(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "fixtures.json", [{}, {"name": "slow", "times": "2"}])
    result = run_fake_upstream("--fixtures", str(rules), "--port", "0")
    assert result.returncode == 2
    assert result.stderr == (
        f"fake-upstream: error: {rules}: rule 1 ('slow'): 'times' must be an integer >= 1, "
        "got a string '2'\n"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--fixtures", "f.json", "--replay", "d"], "--replay and --fixtures cannot be combined"),
        (["--replay-timing", "none"], "--replay-timing needs --replay DIR"),
        (["--fixtures", "/nonexistent/f.json"], "/nonexistent/f.json: no such file or directory"),
    ],
)
def test_bad_fixture_arguments_are_one_line(arguments: list[str], message: str) -> None:
    result = run_fake_upstream(*arguments, "--port", "0")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
