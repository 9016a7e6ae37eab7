"""The Redis settings of the shared limits (DESIGN §2 and §11, issue 13 item 5): their
defaults, and one line naming the setting for every value that cannot be used, which never
repeats a password the URL holds. Through the real `llmproxy serve` as well: a bad Redis
setting, or a bad `[keys.<name>]` table, stops start-up with one line and a non-zero exit.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from llmproxy.config import Configuration, ConfigurationError, load_configuration
from llmproxy.redis_client import RedisAddress
from tests.support import free_port, llmproxy_environment

PASSWORD = "redis-SECRET-password-5e1b"
ACCESS_KEY = "sk-proxy-settings-SECRET-key-0a9c"

# (environment, a fragment of the message)
MALFORMED_REDIS_ENVIRONMENT = [
    ({"LLMPROXY_REDIS_URL": "http://x"}, "redis://"),
    ({"LLMPROXY_REDIS_URL": f"https://:{PASSWORD}@redis.internal:6379/0"}, "redis://"),
    ({"LLMPROXY_REDIS_URL": "garbage"}, "redis://"),
    ({"LLMPROXY_REDIS_URL": "localhost:6379"}, "redis://"),
    ({"LLMPROXY_REDIS_URL": "redis://"}, "no host"),
    ({"LLMPROXY_REDIS_URL": "rediss://"}, "no host"),
    ({"LLMPROXY_REDIS_URL": "redis:///0"}, "no host"),
    ({"LLMPROXY_REDIS_URL": f"redis://:{PASSWORD}@"}, "no host"),
    ({"LLMPROXY_REDIS_URL": f"rediss://default:{PASSWORD}@/1"}, "no host"),
    ({"LLMPROXY_REDIS_URL": "unix://"}, "no socket path"),
    ({"LLMPROXY_REDIS_URL": f"redis://:{PASSWORD}@redis.internal:port/0"}, "port"),
    ({"LLMPROXY_REDIS_URL": f"redis://:{PASSWORD}@redis.internal:65536"}, "port"),
    ({"LLMPROXY_REDIS_URL": f"redis://:{PASSWORD}@[::1/0"}, "IPv6"),
    ({"LLMPROXY_REDIS_TIMEOUT": "0"}, "positive"),
    ({"LLMPROXY_REDIS_TIMEOUT": "0.0"}, "positive"),
    ({"LLMPROXY_REDIS_TIMEOUT": "-0.1"}, "positive"),
    ({"LLMPROXY_REDIS_TIMEOUT": "abc"}, "number"),
    ({"LLMPROXY_REDIS_TIMEOUT": ""}, "number"),
    ({"LLMPROXY_REDIS_TIMEOUT": "nan"}, "positive"),
    ({"LLMPROXY_REDIS_TIMEOUT": "inf"}, "positive"),
    ({"LLMPROXY_REDIS_TIMEOUT": "-inf"}, "positive"),
    ({"LLMPROXY_REDIS_TIMEOUT": "1e400"}, "positive"),  # a float, but an infinite one
    ({"LLMPROXY_REDIS_FAILURE": "maybe"}, "'open' or 'closed'"),
    ({"LLMPROXY_REDIS_FAILURE": ""}, "'open' or 'closed'"),
    ({"LLMPROXY_REDIS_FAILURE": "true"}, "'open' or 'closed'"),
    ({"LLMPROXY_REDIS_FAILURE": "closed,open"}, "'open' or 'closed'"),
]


def assert_one_line_naming(error: ConfigurationError, setting: str) -> str:
    message = str(error)
    assert message.startswith(f"{setting}: "), message
    assert "\n" not in message
    assert "\r" not in message
    assert PASSWORD not in message
    return message


# --- defaults and good values ---------------------------------------------------------------------


def test_the_defaults_are_no_redis_a_tenth_of_a_second_and_fail_open() -> None:
    configuration = load_configuration({})
    assert configuration.redis_url is None
    assert configuration.redis_timeout == 0.1
    assert configuration.redis_failure == "open"
    assert configuration == Configuration()


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1",
        "redis://redis.internal:6380/2",
        f"redis://:{PASSWORD}@redis.internal:6379/0",
        f"redis://limiter:{PASSWORD}@redis.internal/15",
        f"rediss://default:{PASSWORD}@redis.example.com:6380",
        "redis://[::1]:6379/1",
        "unix:///run/redis/redis.sock",
        "unix:///run/redis/redis.sock?db=3",
    ],
)
def test_every_url_form_issue_13_names_is_taken_as_given_and_never_shown(url: str) -> None:
    configuration = load_configuration({"LLMPROXY_REDIS_URL": f"  {url} "})
    assert configuration.redis_url == url
    assert PASSWORD not in repr(configuration)
    assert url not in repr(configuration)


@pytest.mark.parametrize("blank", ["", "   "])
def test_an_empty_url_means_no_redis(blank: str) -> None:
    assert load_configuration({"LLMPROXY_REDIS_URL": blank}).redis_url is None


@pytest.mark.parametrize(
    ("raw", "expected"), [("0.25", 0.25), (" 2 ", 2.0), ("1e-3", 0.001), ("30", 30.0)]
)
def test_a_positive_timeout_is_taken(raw: str, expected: float) -> None:
    assert load_configuration({"LLMPROXY_REDIS_TIMEOUT": raw}).redis_timeout == expected


@pytest.mark.parametrize(
    ("raw", "expected"), [("open", "open"), ("closed", "closed"), (" CLOSED ", "closed")]
)
def test_redis_failure_is_open_or_closed_in_any_case(raw: str, expected: str) -> None:
    assert load_configuration({"LLMPROXY_REDIS_FAILURE": raw}).redis_failure == expected


def test_the_toml_file_spells_them_as_the_fields_and_flags_win(tmp_path: Path) -> None:
    config_file = tmp_path / "llmproxy.toml"
    config_file.write_text(
        f'redis_url = "redis://:{PASSWORD}@redis.internal/4"\n'
        'redis_timeout = 0.5\nredis_failure = "closed"\n'
    )
    from_file = load_configuration({}, config_file=str(config_file))
    assert from_file.redis_url == f"redis://:{PASSWORD}@redis.internal/4"
    assert (from_file.redis_timeout, from_file.redis_failure) == (0.5, "closed")
    flagged = load_configuration(
        {"LLMPROXY_REDIS_TIMEOUT": "3"},
        {"redis_timeout": "0.2", "redis_failure": "open"},
        config_file=str(config_file),
    )
    assert (flagged.redis_timeout, flagged.redis_failure) == (0.2, "open")


# --- values that cannot be used: one line naming the setting --------------------------------------


@pytest.mark.parametrize(("environ", "fragment"), MALFORMED_REDIS_ENVIRONMENT)
def test_each_malformed_redis_setting_names_itself_in_one_line(
    environ: dict[str, str], fragment: str
) -> None:
    ((setting, value),) = environ.items()
    with pytest.raises(ConfigurationError) as raised:
        load_configuration(environ)
    message = assert_one_line_naming(raised.value, setting)
    assert fragment in message
    assert raised.value.setting == setting
    if setting == "LLMPROXY_REDIS_URL":
        assert value not in message  # a URL may hold a password: it is never repeated


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{PASSWORD}@redis.internal:6379/abc",
        f"redis://:{PASSWORD}@redis.internal:6379/-1",
        f"redis://:{PASSWORD}@redis.internal:6379/1.5",
        f"redis://:{PASSWORD}@redis.internal:6379/0/1",
        "unix:///run/redis/redis.sock?db=abc",
    ],
    ids=["letters", "negative", "fraction", "two-segments", "unix-letters"],
)
def test_a_database_that_is_not_a_whole_number_stops_with_one_line(url: str) -> None:
    """`/db` (or `?db=` on a unix socket) must be a whole number >= 0. Accepted here, it would
    stop each worker's start-up with a traceback (`int()` in `RedisAddress.from_url`) or, for
    a negative one, fail every call to Redis (SELECT refuses it) for as long as the proxy runs."""
    with pytest.raises(ConfigurationError) as raised:
        load_configuration({"LLMPROXY_REDIS_URL": url})
    message = assert_one_line_naming(raised.value, "LLMPROXY_REDIS_URL")
    assert url not in message


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        ({"redis_url": "http://x"}, "--redis-url"),
        ({"redis_timeout": "0"}, "--redis-timeout"),
        ({"redis_failure": "maybe"}, "--redis-failure"),
    ],
)
def test_a_bad_flag_is_named_as_the_flag(flags: dict[str, str], flag: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_configuration({"LLMPROXY_REDIS_FAILURE": "closed"}, flags)
    assert_one_line_naming(raised.value, flag)


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ('redis_url = "http://x"', "redis_url"),
        ("redis_url = 6379", "redis_url"),
        ("redis_timeout = 0", "redis_timeout"),
        ('redis_timeout = "soon"', "redis_timeout"),
        ('redis_failure = "maybe"', "redis_failure"),
        ("redis_failure = true", "redis_failure"),
    ],
)
def test_a_bad_value_in_the_toml_file_names_the_file_and_the_field(
    tmp_path: Path, line: str, name: str
) -> None:
    config_file = tmp_path / "llmproxy.toml"
    config_file.write_text(line + "\n")
    with pytest.raises(ConfigurationError) as raised:
        load_configuration({}, config_file=str(config_file))
    assert_one_line_naming(raised.value, f"{name} in {config_file}")


# --- through the real `llmproxy serve` -----------------------------------------------------------


def serve(**environ: str) -> subprocess.CompletedProcess[str]:
    """`python -m llmproxy serve` on a free port: it must stop by itself (a proxy that started
    instead would serve until this times out, and fail the test)."""
    env = llmproxy_environment(LLMPROXY_UPSTREAM_URL="http://127.0.0.1:9/v1", **environ)
    return subprocess.run(
        [sys.executable, "-m", "llmproxy", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def the_one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert result.returncode == 2, result.stderr  # cli.EXIT_BAD_SETTING, not a crash
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("llmproxy: error: "), lines[0]
    return lines[0]


def never_shown() -> list[str]:
    digest = hashlib.sha256(ACCESS_KEY.encode()).hexdigest()
    return [PASSWORD, ACCESS_KEY, digest, digest.upper()]


def test_serve_with_a_bad_redis_failure_stops_with_one_line_naming_it() -> None:
    result = serve(
        LLMPROXY_REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:1/0", LLMPROXY_REDIS_FAILURE="maybe"
    )
    line = the_one_line(result)
    assert line.startswith("llmproxy: error: LLMPROXY_REDIS_FAILURE: ")
    assert "'open' or 'closed'" in line
    for shown in never_shown():
        assert shown not in result.stderr + result.stdout


def test_serve_with_an_unknown_field_in_a_keys_table_stops_with_one_line_naming_the_table(
    tmp_path: Path,
) -> None:
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(f'[keys.x]\nkey = "{ACCESS_KEY}"\nrequests_per_mintue = 5\n')
    result = serve(LLMPROXY_KEYS_FILE=str(keys_file))
    line = the_one_line(result)
    assert line.startswith("llmproxy: error: LLMPROXY_KEYS_FILE: ")
    assert "keys.x" in line
    assert "requests_per_mintue" in line  # what is wrong with it
    for shown in never_shown():
        assert shown not in result.stderr + result.stdout


def test_serve_with_a_limited_key_and_a_bad_redis_database_stops_with_one_line(
    tmp_path: Path,
) -> None:
    """The same check through the CLI: today the configuration accepts the URL, and the
    worker's start-up dies on `int('abc')` with a traceback and exit status 3."""
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(f'[keys.x]\nkey = "{ACCESS_KEY}"\nrequests_per_minute = 5\n')
    result = serve(
        LLMPROXY_KEYS_FILE=str(keys_file),
        LLMPROXY_REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:1/abc",
    )
    line = the_one_line(result)
    assert line.startswith("llmproxy: error: LLMPROXY_REDIS_URL: ")
    for shown in never_shown():
        assert shown not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("url", "db"),
    [
        ("redis://redis.internal:6379", 0),
        ("redis://redis.internal:6379/4", 4),
        ("redis://redis.internal:6379?db=3", 3),  # as redis-py reads it
        ("redis://redis.internal:6379/4?db=3", 4),  # the path wins
        ("rediss://redis.internal/12", 12),
        ("unix:///run/redis/redis.sock?db=2", 2),
        ("unix:///run/redis/redis.sock", 0),
    ],
)
def test_the_database_is_read_from_the_path_or_the_query(url: str, db: int) -> None:
    assert RedisAddress.from_url(url).db == db
    assert load_configuration({"LLMPROXY_REDIS_URL": url}).redis_url == url
