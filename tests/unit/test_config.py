"""Configuration (DESIGN §2): precedence, and one clear line for every malformed setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmproxy import cli
from llmproxy.access import KeyRing, unnamed_key_name
from llmproxy.config import Configuration, ConfigurationError, load_configuration
from llmproxy.websocket_protocol import websocket_server_options

SECRET = "sk-test-SECRET-never-printed"

# (environment, the setting named in the error, a fragment of the message)
MALFORMED_ENVIRONMENT = [
    ({"LLMPROXY_UPSTREAM_URL": "ftp://example.com/v1"}, "LLMPROXY_UPSTREAM_URL", "http://"),
    ({"LLMPROXY_UPSTREAM_URL": "not a url"}, "LLMPROXY_UPSTREAM_URL", "http://"),
    ({"LLMPROXY_UPSTREAM_URL": "http://:80/v1"}, "LLMPROXY_UPSTREAM_URL", "with a host"),
    ({"LLMPROXY_UPSTREAM_URL": "http://h:99999/v1"}, "LLMPROXY_UPSTREAM_URL", "not a valid URL"),
    ({"LLMPROXY_UPSTREAM_URL": "http://h/v1?x=1"}, "LLMPROXY_UPSTREAM_URL", "query"),
    ({"LLMPROXY_UPSTREAM_URL": "http://h/v1,"}, "LLMPROXY_UPSTREAM_URL", "non-empty"),
    (
        {"LLMPROXY_UPSTREAM_URL": f"http://user:{SECRET}@h/v1"},
        "LLMPROXY_UPSTREAM_URL",
        "credentials",
    ),
    ({"LLMPROXY_DEFAULT_HEADERS": "{not json"}, "LLMPROXY_DEFAULT_HEADERS", "not valid JSON"),
    ({"LLMPROXY_DEFAULT_HEADERS": '["a"]'}, "LLMPROXY_DEFAULT_HEADERS", "JSON object"),
    ({"LLMPROXY_DEFAULT_HEADERS": '{"X-A": 1}'}, "LLMPROXY_DEFAULT_HEADERS", "must be a string"),
    ({"LLMPROXY_DEFAULT_HEADERS": '{"bad name": "v"}'}, "LLMPROXY_DEFAULT_HEADERS", "header name"),
    (
        {"LLMPROXY_DEFAULT_HEADERS": '{"X-A": "a\\r\\nInjected: 1"}'},
        "LLMPROXY_DEFAULT_HEADERS",
        "CR, LF",
    ),
    ({"LLMPROXY_DEFAULT_HEADERS": '{"Host": "h"}'}, "LLMPROXY_DEFAULT_HEADERS", "hop-by-hop"),
    (
        {"LLMPROXY_DEFAULT_HEADERS": '{"Connection": "close"}'},
        "LLMPROXY_DEFAULT_HEADERS",
        "hop-by-hop",
    ),
    ({"LLMPROXY_DEFAULT_HEADERS": '{"X-A": "1", "x-a": "2"}'}, "LLMPROXY_DEFAULT_HEADERS", "twice"),
    ({"LLMPROXY_UPSTREAM_API_KEY": "two words"}, "LLMPROXY_UPSTREAM_API_KEY", "spaces"),
    ({"LLMPROXY_CONNECT_TIMEOUT": "-1"}, "LLMPROXY_CONNECT_TIMEOUT", "positive"),
    ({"LLMPROXY_CONNECT_TIMEOUT": "soon"}, "LLMPROXY_CONNECT_TIMEOUT", "number"),
    ({"LLMPROXY_READ_TIMEOUT": "0"}, "LLMPROXY_READ_TIMEOUT", "positive"),
    ({"LLMPROXY_READ_TIMEOUT": "nan"}, "LLMPROXY_READ_TIMEOUT", "positive"),
    ({"LLMPROXY_READ_TIMEOUT": "inf"}, "LLMPROXY_READ_TIMEOUT", "positive"),
    ({"LLMPROXY_PORT": "http"}, "LLMPROXY_PORT", "whole number"),
    ({"LLMPROXY_PORT": "70000"}, "LLMPROXY_PORT", "65535"),
    ({"LLMPROXY_WORKERS": "0"}, "LLMPROXY_WORKERS", "at least 1"),
    ({"LLMPROXY_HOST": " "}, "LLMPROXY_HOST", "host"),
]


@pytest.mark.parametrize(("environ", "setting", "fragment"), MALFORMED_ENVIRONMENT)
def test_each_malformed_setting_names_itself(
    environ: dict[str, str], setting: str, fragment: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_configuration(environ)
    message = str(raised.value)
    assert message.startswith(f"{setting}: ")
    assert fragment in message
    assert "\n" not in message
    assert SECRET not in message


def test_defaults() -> None:
    configuration = load_configuration({})
    assert configuration == Configuration()
    assert configuration.upstream_url == "https://api.openai.com/v1"
    assert configuration.connect_timeout == 10.0
    assert configuration.read_timeout == 600.0


def test_environment_settings_are_parsed() -> None:
    configuration = load_configuration(
        {
            "LLMPROXY_UPSTREAM_URL": "http://127.0.0.1:9000/v1/",
            "LLMPROXY_DEFAULT_HEADERS": '{"OpenAI-Organization": "org-1", "X-Team": "a"}',
            "LLMPROXY_UPSTREAM_API_KEY": SECRET,
            "LLMPROXY_CONNECT_TIMEOUT": "2.5",
            "LLMPROXY_READ_TIMEOUT": "30",
        }
    )
    assert configuration.upstream_urls == ("http://127.0.0.1:9000/v1",)
    assert configuration.connect_timeout == 2.5
    assert configuration.read_timeout == 30.0
    assert configuration.upstream_headers() == (
        ("Authorization", f"Bearer {SECRET}"),
        ("OpenAI-Organization", "org-1"),
        ("X-Team", "a"),
    )
    assert SECRET not in repr(configuration)


def test_api_key_replaces_a_default_authorization() -> None:
    configuration = load_configuration(
        {
            "LLMPROXY_DEFAULT_HEADERS": '{"authorization": "Bearer old"}',
            "LLMPROXY_UPSTREAM_API_KEY": "sk-new",
        }
    )
    assert configuration.upstream_headers() == (("Authorization", "Bearer sk-new"),)


def test_flags_beat_environment_beats_file(tmp_path: Path) -> None:
    config_file = tmp_path / "llmproxy.toml"
    config_file.write_text(
        'upstream_url = "http://file/v1"\nread_timeout = 5\nconnect_timeout = 7\nport = 1234\n'
        '[default_headers]\nX-From = "file"\n'
    )
    configuration = load_configuration(
        {"LLMPROXY_READ_TIMEOUT": "6", "LLMPROXY_UPSTREAM_URL": "http://env/v1"},
        flags={"upstream_urls": "http://flag/v1"},
        config_file=str(config_file),
    )
    assert configuration.upstream_urls == ("http://flag/v1",)
    assert configuration.read_timeout == 6.0
    assert configuration.connect_timeout == 7.0
    assert configuration.port == 1234
    assert configuration.default_headers == (("X-From", "file"),)


def test_client_timeouts_default_to_nginx_s_and_come_from_every_source(tmp_path: Path) -> None:
    assert load_configuration({}).client_header_timeout == 60.0
    assert load_configuration({}).client_body_timeout == 60.0
    config_file = tmp_path / "timeouts.toml"
    config_file.write_text("client_header_timeout = 7\nclient_body_timeout = 8\n")
    from_file = load_configuration({}, config_file=str(config_file))
    assert (from_file.client_header_timeout, from_file.client_body_timeout) == (7.0, 8.0)
    from_env = load_configuration(
        {"LLMPROXY_CLIENT_HEADER_TIMEOUT": "2.5", "LLMPROXY_CLIENT_BODY_TIMEOUT": "3"},
        config_file=str(config_file),
    )
    assert (from_env.client_header_timeout, from_env.client_body_timeout) == (2.5, 3.0)
    from_flags = load_configuration(
        {"LLMPROXY_CLIENT_HEADER_TIMEOUT": "2.5"},
        flags={"client_header_timeout": "1", "client_body_timeout": "4"},
    )
    assert (from_flags.client_header_timeout, from_flags.client_body_timeout) == (1.0, 4.0)


def test_the_websocket_message_limit_defaults_to_16_mib_apart_from_the_body_limit() -> None:
    configuration = load_configuration({})
    assert configuration.max_ws_message_bytes == 16 * 1024 * 1024
    assert configuration.max_body_bytes == 32 * 1024 * 1024
    # Each setting sets its own limit only.
    assert load_configuration({"LLMPROXY_MAX_BODY_BYTES": "7"}).max_ws_message_bytes == 16 << 20
    assert load_configuration({"LLMPROXY_MAX_WS_MESSAGE_BYTES": "7"}).max_body_bytes == 32 << 20


def test_the_websocket_message_limit_comes_from_every_source(tmp_path: Path) -> None:
    config_file = tmp_path / "ws.toml"
    config_file.write_text("max_ws_message_bytes = 4096\n")
    from_file = load_configuration({}, config_file=str(config_file))
    assert from_file.max_ws_message_bytes == 4096
    from_env = load_configuration(
        {"LLMPROXY_MAX_WS_MESSAGE_BYTES": "2048"}, config_file=str(config_file)
    )
    assert from_env.max_ws_message_bytes == 2048
    from_flag = load_configuration(
        {"LLMPROXY_MAX_WS_MESSAGE_BYTES": "2048"},
        flags={"max_ws_message_bytes": "1024"},
        config_file=str(config_file),
    )
    assert from_flag.max_ws_message_bytes == 1024
    assert "max_ws_message_bytes=1024" in repr(from_flag)


def test_the_websocket_message_limit_flag_reaches_the_served_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served: list[Configuration] = []
    monkeypatch.setattr(cli, "serve", lambda configuration, log_level: served.append(configuration))
    for name in [k for k in os.environ if k.startswith("LLMPROXY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # export_flags writes here
    cli.main(["serve", "--max-ws-message-bytes", "65536"])
    assert [configuration.max_ws_message_bytes for configuration in served] == [65536]
    # Exported for the worker processes, which read their configuration from the environment.
    assert os.environ["LLMPROXY_MAX_WS_MESSAGE_BYTES"] == "65536"


def test_the_websocket_message_limit_is_the_servers_frame_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn

    options: list[dict[str, object]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: options.append(kwargs))
    limits = []
    for limit in (12345, 16 * 1024 * 1024):
        cli.serve(Configuration(max_ws_message_bytes=limit, max_body_bytes=7), "warning")
        frame_limit = options[-1]["ws_max_size"]
        assert frame_limit == websocket_server_options(limit)["ws_max_size"]
        assert isinstance(frame_limit, int)
        # websockets refuses above it (1009) before the relay sees the message: never below
        # the limit, and not far above it (deflate's headroom only).
        assert limit <= frame_limit <= limit * 1.01 + 2048
        limits.append(frame_limit)
    assert limits[0] < limits[1]


def test_config_file_from_environment_and_url_list(tmp_path: Path) -> None:
    config_file = tmp_path / "llmproxy.toml"
    config_file.write_text('upstream_url = ["http://a/v1", "http://b/v1"]\n')
    configuration = load_configuration({"LLMPROXY_CONFIG": str(config_file)})
    assert configuration.upstream_urls == ("http://a/v1", "http://b/v1")


@pytest.mark.parametrize(
    ("content", "setting", "fragment"),
    [
        ("read_timeout = \n", "--config", "not valid TOML"),
        ("read_timout = 5\n", "read_timout in", "unknown setting"),
        ("read_timeout = -5\n", "read_timeout in", "positive"),
        ("read_timeout = true\n", "read_timeout in", "number"),
        ("default_headers = 5\n", "default_headers in", "JSON object"),
        ("port = 8080.5\n", "port in", "whole number"),
        ('max_ws_message_bytes = "16MiB"\n', "max_ws_message_bytes in", "whole number"),
        ("max_ws_message_bytes = 0\n", "max_ws_message_bytes in", "at least 1"),
    ],
)
def test_malformed_file_settings(tmp_path: Path, content: str, setting: str, fragment: str) -> None:
    config_file = tmp_path / "bad.toml"
    config_file.write_text(content)
    with pytest.raises(ConfigurationError) as raised:
        load_configuration({}, config_file=str(config_file))
    assert str(raised.value).startswith(setting)
    assert fragment in str(raised.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot be read"):
        load_configuration({}, config_file=str(tmp_path / "absent.toml"))


def run_cli(*args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")} | environ
    return subprocess.run(
        [sys.executable, "-m", "llmproxy", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "environ", "expected"),
    [
        (
            ["serve"],
            {"LLMPROXY_DEFAULT_HEADERS": f'{{"Authorization": {SECRET!r}'},
            "llmproxy: error: LLMPROXY_DEFAULT_HEADERS: is not valid JSON",
        ),
        (["serve", "--read-timeout", "-3"], {}, "llmproxy: error: --read-timeout: must be"),
        (["serve", "--port", "x"], {}, "llmproxy: error: --port: must be a whole number"),
        (
            ["serve", "--client-header-timeout", "0"],
            {},
            "llmproxy: error: --client-header-timeout: must be a positive number",
        ),
        (
            ["serve"],
            {"LLMPROXY_CLIENT_BODY_TIMEOUT": "soon"},
            "llmproxy: error: LLMPROXY_CLIENT_BODY_TIMEOUT: must be a number",
        ),
        (
            ["serve", "--max-ws-message-bytes", "0"],
            {},
            "llmproxy: error: --max-ws-message-bytes: must be a whole number of bytes",
        ),
        (
            ["serve"],
            {"LLMPROXY_MAX_WS_MESSAGE_BYTES": "lots"},
            "llmproxy: error: LLMPROXY_MAX_WS_MESSAGE_BYTES: must be a whole number",
        ),
        (["serve", "--config", "/nonexistent.toml"], {}, "llmproxy: error: --config"),
        (["serve", "--bogus"], {}, "llmproxy: error: unrecognized arguments: --bogus"),
    ],
)
def test_cli_bad_setting_is_one_line_and_exit_2(
    args: list[str], environ: dict[str, str], expected: str
) -> None:
    result = run_cli(*args, **environ)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(expected)
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr + result.stdout


def test_per_upstream_headers_from_the_file_win_over_shared_ones(tmp_path: Path) -> None:
    config_file = tmp_path / "failover.toml"
    config_file.write_text(
        'upstream_url = ["http://a/v1", "http://b/v1/"]\n'
        'upstream_api_key = "sk-shared"\n'
        '[default_headers]\nX-Team = "t"\nOpenAI-Organization = "org-shared"\n'
        '[upstream_headers."http://b/v1"]\nauthorization = "Bearer sk-b"\n'
    )
    configuration = load_configuration({}, config_file=str(config_file))
    first, second = configuration.upstreams()
    assert first.base_url == "http://a/v1"
    assert first.headers == (
        ("Authorization", "Bearer sk-shared"),
        ("X-Team", "t"),
        ("OpenAI-Organization", "org-shared"),
    )
    assert second.base_url == "http://b/v1"
    assert second.headers == (
        ("authorization", "Bearer sk-b"),
        ("X-Team", "t"),
        ("OpenAI-Organization", "org-shared"),
    )


def test_per_upstream_headers_must_name_a_configured_upstream(tmp_path: Path) -> None:
    config_file = tmp_path / "typo.toml"
    config_file.write_text(
        'upstream_url = "http://a/v1"\n[upstream_headers."http://typo/v1"]\nX-A = "1"\n'
    )
    with pytest.raises(ConfigurationError) as raised:
        load_configuration({}, config_file=str(config_file))
    assert str(raised.value).startswith(f"upstream_headers in {config_file}: ")
    assert "not one of the upstream URLs" in str(raised.value)


@pytest.mark.parametrize(
    ("environ", "setting", "fragment"),
    [
        ({"LLMPROXY_ACCESS_KEYS": f"{SECRET}, has space"}, "LLMPROXY_ACCESS_KEYS", "key number 2"),
        ({"LLMPROXY_ACCESS_KEYS_FILE": "/nonexistent"}, "LLMPROXY_ACCESS_KEYS_FILE", "cannot"),
        ({"LLMPROXY_MAX_BODY_BYTES": "0"}, "LLMPROXY_MAX_BODY_BYTES", "at least 1"),
        ({"LLMPROXY_MAX_WS_MESSAGE_BYTES": "0"}, "LLMPROXY_MAX_WS_MESSAGE_BYTES", "at least 1"),
        ({"LLMPROXY_MAX_WS_MESSAGE_BYTES": "-5"}, "LLMPROXY_MAX_WS_MESSAGE_BYTES", "at least 1"),
        ({"LLMPROXY_MAX_WS_MESSAGE_BYTES": "16MiB"}, "LLMPROXY_MAX_WS_MESSAGE_BYTES", "whole"),
        ({"LLMPROXY_MAX_WS_MESSAGE_BYTES": "1.5"}, "LLMPROXY_MAX_WS_MESSAGE_BYTES", "whole"),
        ({"LLMPROXY_MAX_CONCURRENT_REQUESTS": "-2"}, "LLMPROXY_MAX_CONCURRENT_REQUESTS", "whole"),
        ({"LLMPROXY_LOG_FORMAT": "xml"}, "LLMPROXY_LOG_FORMAT", "'text' or 'json'"),
        (
            {"LLMPROXY_UPSTREAM_URL": "http://localhost:8080/v1"},
            "LLMPROXY_UPSTREAM_URL",
            "points back at the proxy itself",
        ),
        (
            {"LLMPROXY_UPSTREAM_URL": "http://127.0.0.1:9000/v1", "LLMPROXY_PORT": "9000"},
            "LLMPROXY_UPSTREAM_URL",
            "points back at the proxy itself",
        ),
    ],
)
def test_malformed_safety_settings(environ: dict[str, str], setting: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_configuration(environ)
    assert str(raised.value).startswith(f"{setting}: ")
    assert fragment in str(raised.value)
    assert SECRET not in str(raised.value)


def test_access_keys_from_variable_and_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# team keys\nkey-from-file-1\n\n  key-from-file-2  \n")
    configuration = load_configuration(
        {"LLMPROXY_ACCESS_KEYS": "key-a,key-b", "LLMPROXY_ACCESS_KEYS_FILE": str(keys_file)}
    )
    ring = KeyRing(configuration.proxy_access_keys())
    for key in ("key-a", "key-b", "key-from-file-1", "key-from-file-2"):
        found = ring.find(key)
        assert found is not None
        assert found.name == unnamed_key_name(key)
    assert ring.find("key-c") is None
    assert len(configuration.proxy_access_keys()) == 4
    assert "key-a" not in repr(configuration)


def test_another_port_on_loopback_is_not_a_loop() -> None:
    configuration = load_configuration({"LLMPROXY_UPSTREAM_URL": "http://127.0.0.1:8090/v1"})
    assert configuration.upstream_url == "http://127.0.0.1:8090/v1"


@pytest.mark.parametrize(
    ("args", "warned"),
    [
        (["--host", "0.0.0.0"], True),
        (["--host", "127.0.0.1"], False),
        (["--host", "0.0.0.0", "--port", "8081"], True),
    ],
)
def test_serving_beyond_loopback_without_keys_warns_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    warned: bool,
) -> None:
    served: list[Configuration] = []
    monkeypatch.setattr(cli, "serve", lambda configuration, log_level: served.append(configuration))
    for name in [k for k in os.environ if k.startswith("LLMPROXY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # export_flags writes here
    cli.main(["serve", *args])
    assert len(served) == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    expected = [
        "llmproxy: warning: listening on 0.0.0.0 without access keys: anyone who can reach it "
        "can spend the upstream key (set LLMPROXY_ACCESS_KEYS)"
    ]
    assert warnings == (expected if warned else [])


@pytest.mark.parametrize(
    "variable", ["LLMPROXY_UPSTREAM_CA_BUNDLE", "LLMPROXY_UPSTREAM_CLIENT_CERT"]
)
def test_a_tls_file_that_is_missing_or_not_pem_stops_start_up_naming_it(
    tmp_path: Path, variable: str
) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("just text\n")
    for path, fragment in ((tmp_path / "missing.pem", "cannot be read"), (not_pem, "not a PEM")):
        with pytest.raises(ConfigurationError) as raised:
            load_configuration({variable: str(path)})
        message = str(raised.value)
        assert message.startswith(f"{variable}: ")
        assert fragment in message
        assert "\n" not in message


def test_a_pem_file_of_no_certificate_stops_start_up_naming_the_bundle(tmp_path: Path) -> None:
    fake = tmp_path / "fake.pem"
    fake.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigurationError) as raised:
        load_configuration({"LLMPROXY_UPSTREAM_CA_BUNDLE": str(fake)})
    assert str(raised.value).startswith("LLMPROXY_UPSTREAM_CA_BUNDLE: ")


def test_a_client_key_without_its_certificate_stops_start_up(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigurationError) as raised:
        load_configuration({"LLMPROXY_UPSTREAM_CLIENT_KEY": str(key)})
    assert str(raised.value).startswith("LLMPROXY_UPSTREAM_CLIENT_KEY: ")
    assert "upstream_client_cert" in str(raised.value)
