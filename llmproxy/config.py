"""Configuration: one immutable object, built from CLI flags > environment > TOML file > defaults.

Every setting is a row of `SETTINGS`; its parser is a pure function that raises `ValueError`
with a message that names what is wrong but never repeats a secret. `load_configuration` turns
that into a `ConfigurationError` naming the setting as the user spelled it (flag, variable or
file key), which the CLI prints as one line before exiting with status 2 (DESIGN §2).
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from llmproxy.access import AccessKey
from llmproxy.egress import (
    NO_PROXY_SETTING,
    PROXY_VARIABLES,
    EgressProxy,
    parse_proxy_url,
    proxy_for,
    proxy_variable_in_use,
)
from llmproxy.headers import CLIENT_SET_REQUEST_HEADERS, HOP_BY_HOP_HEADERS
from llmproxy.keys_config import check_distinct, parse_key_tables, parse_keys_file, unnamed_keys
from llmproxy.redis_client import RedisAddress
from llmproxy.retry import (
    RetryPolicy,
    parse_max_attempts,
    parse_retry_after_cap,
    parse_retry_deadline,
    parse_retry_statuses,
)
from llmproxy.tls import TlsFileError, upstream_ssl_context

CONFIG_FILE_ENV = "LLMPROXY_CONFIG"

# RFC 9110 §5.1 field-name = token; §5.5 field values exclude CR, LF and NUL.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_FORBIDDEN_IN_VALUE = re.compile(r"[\r\n\x00]")

Headers = tuple[tuple[str, str], ...]


class ConfigurationError(Exception):
    """A setting that cannot be used; `str()` is the one line shown to the user."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting


@dataclass(frozen=True, slots=True)
class Upstream:
    """One upstream base URL and the complete set of default headers sent to it."""

    base_url: str
    headers: Headers = field(repr=False)


@dataclass(frozen=True, slots=True)
class Configuration:
    """Everything the proxy needs to run; built once at start-up, never mutated."""

    upstream_urls: tuple[str, ...] = ("https://api.openai.com/v1",)
    default_headers: Headers = ()
    upstream_api_key: str | None = field(default=None, repr=False)
    # Extra default headers per upstream URL (TOML only), winning over `default_headers`.
    upstream_headers_by_url: tuple[tuple[str, Headers], ...] = field(default=(), repr=False)
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    max_attempts: int = 3
    retry_statuses: frozenset[int] = frozenset()
    retry_deadline: float = 30.0
    retry_after_cap: float = 20.0
    sse_keepalive: float | None = None  # seconds of upstream silence before `: keep-alive`
    access_keys: tuple[str, ...] = field(default=(), repr=False)
    access_keys_from_file: tuple[str, ...] = field(default=(), repr=False)
    # `[keys.<name>]` tables (DESIGN §11): in the config file, and in LLMPROXY_KEYS_FILE.
    named_keys: tuple[AccessKey, ...] = field(default=(), repr=False)
    named_keys_from_file: tuple[AccessKey, ...] = field(default=(), repr=False)
    max_body_bytes: int = 32 * 1024 * 1024
    # Bodies up to this are held whole (retries and failover can resend them); larger ones are
    # streamed to the upstream as they arrive and not retried once sent (DESIGN §12).
    request_buffer_bytes: int = 1024 * 1024
    # The largest WebSocket message either side may send (DESIGN §10); larger closes with 1009.
    max_ws_message_bytes: int = 16 * 1024 * 1024
    max_concurrent_requests: int | None = None  # per worker process; None = no cap
    log_format: str = "text"
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    # From a connection's opening (or a kept-alive one's next first byte) to the end of the
    # head; and the longest silence within a request body (nginx's, DESIGN §13).
    client_header_timeout: float = 60.0
    client_body_timeout: float = 60.0
    # Egress (DESIGN §12): a proxy URL or "none" (then the environment is not read), and the
    # proxy variables of the environment the configuration was loaded from.
    upstream_proxy: str | None = field(default=None, repr=False)  # may hold credentials
    proxy_environment: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # TLS towards the upstream (DESIGN §12): extra trusted CAs, a client certificate and key.
    upstream_ca_bundle: str | None = None
    upstream_client_cert: str | None = None
    upstream_client_key: str | None = None
    # Per-key limits shared through Redis (DESIGN §11); without a URL they live in the process.
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    redis_timeout: float = 0.1  # seconds, each call
    redis_failure: str = "open"  # "open": let requests pass while Redis fails; "closed": 503
    # Ask streamed chat/completions requests for usage and hide the usage-only chunk (§11).
    usage_injection: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1

    @property
    def upstream_url(self) -> str:
        """The first (primary) upstream base URL."""
        return self.upstream_urls[0]

    def upstream_headers(self, base_url: str | None = None) -> Headers:
        """Default headers for one upstream: its own, then the API key, then the shared ones.

        Earlier sources win, compared case-insensitively: an upstream's own `Authorization`
        beats the API key shorthand, which beats an `Authorization` in `default_headers`.
        """
        own = dict(self.upstream_headers_by_url).get(base_url or self.upstream_url, ())
        key = (
            ()
            if self.upstream_api_key is None
            else (("Authorization", f"Bearer {self.upstream_api_key}"),)
        )
        merged: list[tuple[str, str]] = []
        seen: set[str] = set()
        for name, value in (*own, *key, *self.default_headers):
            if name.lower() not in seen:
                seen.add(name.lower())
                merged.append((name, value))
        return tuple(merged)

    def egress_proxy(self, base_url: str) -> EgressProxy | None:
        """The egress proxy requests to `base_url` go through, or None (DESIGN §12)."""
        return proxy_for(base_url, dict(self.proxy_environment), self.upstream_proxy)

    def proxy_access_keys(self) -> tuple[AccessKey, ...]:
        """Every key a client may present to use the proxy; empty means the proxy is open.

        Keys given without a name come first, named `key-` + 8 hex digits of their SHA-256.
        """
        return (
            unnamed_keys(self.access_keys + self.access_keys_from_file)
            + self.named_keys
            + self.named_keys_from_file
        )

    def retry_policy(self) -> RetryPolicy:
        """The retry rules these settings describe (DESIGN §6)."""
        return RetryPolicy(
            max_attempts=self.max_attempts,
            retry_statuses=self.retry_statuses,
            deadline=self.retry_deadline,
            retry_after_cap=self.retry_after_cap,
        )

    def upstreams(self) -> tuple[Upstream, ...]:
        """Every upstream in failover order, with its headers."""
        return tuple(Upstream(url, self.upstream_headers(url)) for url in self.upstream_urls)

    def __repr__(self) -> str:
        # Header values may be keys; a repr ends up in logs and tracebacks.
        names = ", ".join(name for name, _ in self.default_headers)
        return (
            f"Configuration(upstream_urls={self.upstream_urls!r}, default_headers=[{names}], "
            f"upstream_api_key={'set' if self.upstream_api_key else 'unset'}, "
            f"connect_timeout={self.connect_timeout}, read_timeout={self.read_timeout}, "
            f"max_attempts={self.max_attempts}, retry_statuses={sorted(self.retry_statuses)}, "
            f"retry_deadline={self.retry_deadline}, retry_after_cap={self.retry_after_cap}, "
            f"sse_keepalive={self.sse_keepalive}, "
            f"access_keys={len(self.proxy_access_keys())} configured, "
            f"max_body_bytes={self.max_body_bytes}, "
            f"request_buffer_bytes={self.request_buffer_bytes}, "
            f"max_ws_message_bytes={self.max_ws_message_bytes}, "
            f"max_concurrent_requests={self.max_concurrent_requests}, "
            f"log_format={self.log_format!r}, drain_timeout={self.drain_timeout}, "
            f"client_header_timeout={self.client_header_timeout}, "
            f"client_body_timeout={self.client_body_timeout}, "
            f"upstream_proxy={'set' if self.upstream_proxy else 'unset'}, "
            f"upstream_ca_bundle={self.upstream_ca_bundle!r}, "
            f"upstream_client_cert={self.upstream_client_cert!r}, "
            f"upstream_client_key={self.upstream_client_key!r}, "
            f"redis_url={'set' if self.redis_url else 'unset'}, "
            f"redis_timeout={self.redis_timeout}, redis_failure={self.redis_failure!r}, "
            f"usage_injection={self.usage_injection}, "
            f"host={self.host!r}, port={self.port}, workers={self.workers})"
        )


# ---------------------------------------------------------------------------------------------
# Parsers: value as found (str from flags and environment; TOML types from the file) -> value.


def parse_upstream_urls(raw: object) -> tuple[str, ...]:
    """One base URL, or several (comma-separated, or a TOML list) for failover."""
    if isinstance(raw, str):
        items = [part.strip() for part in raw.split(",")]
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        items = [item.strip() for item in raw]
    else:
        raise ValueError("must be a URL or a list of URLs")
    if not items or any(not item for item in items):
        raise ValueError("must be a non-empty URL, or URLs separated by commas")
    return tuple(_parse_base_url(item) for item in items)


def _parse_base_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError:
        raise ValueError("is not a valid URL") from None
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials; put them in LLMPROXY_DEFAULT_HEADERS")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"must not have a query or fragment, got {url!r}")
    del port
    return url.rstrip("/")


def parse_default_headers(raw: object) -> Headers:
    """A JSON object (or TOML table) of header name -> string value."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            # The message of the JSON error may quote the value, which may hold a key.
            raise ValueError("is not valid JSON (expected an object of strings)") from None
    if not isinstance(raw, dict):
        raise ValueError("must be a JSON object of header name to string value")
    seen: set[str] = set()
    headers: list[tuple[str, str]] = []
    for name, value in raw.items():
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise ValueError(f"{name!r} is not a valid header name")
        if not isinstance(value, str):
            raise ValueError(f"the value of {name!r} must be a string")
        if _FORBIDDEN_IN_VALUE.search(value):
            raise ValueError(f"the value of {name!r} contains CR, LF or NUL")
        lowered = name.lower()
        if lowered in HOP_BY_HOP_HEADERS or lowered in CLIENT_SET_REQUEST_HEADERS:
            raise ValueError(f"{name!r} is hop-by-hop or set by the proxy; it cannot be a default")
        if lowered in seen:
            raise ValueError(f"{name!r} is given twice (header names ignore case)")
        seen.add(lowered)
        headers.append((name, value))
    return tuple(headers)


def parse_upstream_headers_by_url(raw: object) -> tuple[tuple[str, Headers], ...]:
    """A TOML table of upstream URL -> table of default headers for that upstream."""
    if not isinstance(raw, dict):
        raise ValueError("must be a table of upstream URL -> table of headers")
    parsed: list[tuple[str, Headers]] = []
    for url, headers in raw.items():
        try:
            parsed.append((_parse_base_url(url), parse_default_headers(headers)))
        except ValueError as error:
            raise ValueError(f"[{url!r}] {error}") from None
    return tuple(parsed)


def parse_api_key(raw: object) -> str | None:
    """The upstream API key, sent as `Authorization: Bearer <key>`; empty means unset."""
    if not isinstance(raw, str):
        raise ValueError("must be a string")
    key = raw.strip()
    if _FORBIDDEN_IN_VALUE.search(key) or " " in key:
        raise ValueError("contains spaces, CR, LF or NUL")
    return key or None


def parse_timeout(raw: object) -> float:
    """Seconds, a finite positive number."""
    value = _parse_number(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number of seconds, got {raw!r}")
    return value


def parse_keepalive(raw: object) -> float | None:
    """Seconds of upstream silence before an SSE keep-alive comment; 0 or empty turns it off."""
    if isinstance(raw, str) and raw.strip().lower() in ("", "0", "off"):
        return None
    if raw == 0:
        return None
    return parse_timeout(raw)


def parse_access_keys(raw: object) -> tuple[str, ...]:
    """Proxy access keys: comma-separated, or a TOML list of strings."""
    if isinstance(raw, str):
        items = [part.strip() for part in raw.split(",") if part.strip()]
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        items = [item.strip() for item in raw]
    else:
        raise ValueError("must be keys separated by commas, or a list of strings")
    for number, key in enumerate(items, start=1):
        # The value is never repeated: it is a secret.
        if not key or any(c.isspace() or ord(c) < 0x21 or ord(c) > 0x7E for c in key):
            raise ValueError(f"key number {number} is empty or has spaces or control characters")
    return tuple(items)


def parse_access_keys_file(raw: object) -> tuple[str, ...]:
    """A file of proxy access keys, one per line; blank lines and `#` comments ignored."""
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError("must be the path of a file of keys, one per line")
    try:
        with open(raw.strip(), encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot be read ({getattr(error, 'strerror', None) or error})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError("holds no keys")
    return parse_access_keys(keys)


def parse_byte_count(raw: object) -> int:
    """A size limit in bytes (the largest request body, the largest WebSocket message)."""
    value = _parse_int(raw)
    if value < 1:
        raise ValueError(f"must be a whole number of bytes of at least 1, got {raw!r}")
    return value


def parse_max_concurrent(raw: object) -> int | None:
    """Concurrent upstream requests per worker before answering 503; 0 or empty means no cap."""
    if isinstance(raw, str) and raw.strip() in ("", "0"):
        return None
    value = _parse_int(raw)
    if value < 0:
        raise ValueError(f"must be a whole number (0 = no cap), got {raw!r}")
    return value or None


def parse_redis_url(raw: object) -> str | None:
    """`redis://[:password@]host[:port][/db]`, `rediss://` (TLS) or `unix:///path`; empty: none."""
    if not isinstance(raw, str):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    value = raw.strip()
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")  # never the value
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("names no host")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("names no socket path")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError("has a port that is not a number from 0 to 65535") from None
    RedisAddress.from_url(value)  # its database number (the message never holds the URL)
    return value


def parse_upstream_proxy(raw: object) -> str | None:
    """An `http://[user:password@]host[:port]` proxy URL, or `none`; empty: the environment's."""
    if not isinstance(raw, str):
        raise ValueError("must be an http:// proxy URL or 'none'")
    value = raw.strip()
    if not value:
        return None
    if value.lower() == NO_PROXY_SETTING:
        return NO_PROXY_SETTING
    parse_proxy_url(value)  # raises ValueError with a message that never repeats the URL
    return value


def parse_pem_file(raw: object) -> str | None:
    """The path of a PEM file that exists and looks like PEM; empty: none."""
    if not isinstance(raw, str):
        raise ValueError("must be the path of a PEM file")
    path = raw.strip()
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 20)
    except OSError as error:
        raise ValueError(f"cannot be read: {path} ({error.strerror})") from None
    if b"-----BEGIN " not in head:
        raise ValueError(f"is not a PEM file: {path}")
    return path


def parse_redis_failure(raw: object) -> str:
    """`open` (requests pass while Redis fails) or `closed` (they get 503)."""
    if not isinstance(raw, str) or raw.strip().lower() not in ("open", "closed"):
        raise ValueError(f"must be 'open' or 'closed', got {raw!r}")
    return raw.strip().lower()


def parse_bool(raw: object) -> bool:
    """true/false, yes/no, on/off, 1/0, or a TOML boolean."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        lowered = raw.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0", ""):
            return False
    raise ValueError(f"must be true or false, got {raw!r}")


def parse_log_format(raw: object) -> str:
    """`text` (readable) or `json` (one object per line)."""
    if not isinstance(raw, str) or raw.strip().lower() not in ("text", "json"):
        raise ValueError(f"must be 'text' or 'json', got {raw!r}")
    return raw.strip().lower()


def parse_port(raw: object) -> int:
    """A TCP port, 0 meaning any free port."""
    value = _parse_int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a port number from 0 to 65535, got {raw!r}")
    return value


def parse_workers(raw: object) -> int:
    """How many server processes; at least one."""
    value = _parse_int(raw)
    if value < 1:
        raise ValueError(f"must be a whole number of at least 1, got {raw!r}")
    return value


def parse_host(raw: object) -> str:
    """The interface to listen on."""
    if not isinstance(raw, str) or not raw.strip() or any(c.isspace() for c in raw.strip()):
        raise ValueError(f"must be a host name or IP address, got {raw!r}")
    return raw.strip()


def _parse_number(raw: object) -> float:
    if isinstance(raw, bool):
        raise ValueError(f"must be a number, got {raw!r}")
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw.strip())
        except ValueError:
            pass
    raise ValueError(f"must be a number, got {raw!r}")


def _parse_int(raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lstrip("+-").isdigit():
        return int(raw.strip())
    raise ValueError(f"must be a whole number, got {raw!r}")


@dataclass(frozen=True, slots=True)
class Setting:
    """One configuration setting and the three names users give it."""

    field: str  # Configuration attribute, and the key in the TOML file
    env: str
    flag: str | None
    parse: Callable[[object], Any]


SETTINGS: tuple[Setting, ...] = (
    Setting("upstream_urls", "LLMPROXY_UPSTREAM_URL", "--upstream-url", parse_upstream_urls),
    Setting("default_headers", "LLMPROXY_DEFAULT_HEADERS", None, parse_default_headers),
    Setting("upstream_api_key", "LLMPROXY_UPSTREAM_API_KEY", None, parse_api_key),
    # TOML only: per-upstream headers have no sensible one-variable spelling.
    Setting("upstream_headers_by_url", "", None, parse_upstream_headers_by_url),
    Setting("connect_timeout", "LLMPROXY_CONNECT_TIMEOUT", "--connect-timeout", parse_timeout),
    Setting("read_timeout", "LLMPROXY_READ_TIMEOUT", "--read-timeout", parse_timeout),
    Setting("max_attempts", "LLMPROXY_MAX_ATTEMPTS", "--max-attempts", parse_max_attempts),
    Setting("retry_statuses", "LLMPROXY_RETRY_STATUSES", "--retry-statuses", parse_retry_statuses),
    Setting("retry_deadline", "LLMPROXY_RETRY_DEADLINE", "--retry-deadline", parse_retry_deadline),
    Setting(
        "retry_after_cap", "LLMPROXY_RETRY_AFTER_CAP", "--retry-after-cap", parse_retry_after_cap
    ),
    Setting("sse_keepalive", "LLMPROXY_SSE_KEEPALIVE", "--sse-keepalive", parse_keepalive),
    Setting("access_keys", "LLMPROXY_ACCESS_KEYS", None, parse_access_keys),
    Setting("access_keys_from_file", "LLMPROXY_ACCESS_KEYS_FILE", None, parse_access_keys_file),
    # TOML only: `[keys.<name>]` tables.
    Setting("named_keys", "", None, parse_key_tables),
    Setting("named_keys_from_file", "LLMPROXY_KEYS_FILE", None, parse_keys_file),
    Setting("max_body_bytes", "LLMPROXY_MAX_BODY_BYTES", "--max-body-bytes", parse_byte_count),
    Setting(
        "request_buffer_bytes",
        "LLMPROXY_REQUEST_BUFFER_BYTES",
        "--request-buffer-bytes",
        parse_byte_count,
    ),
    Setting(
        "max_ws_message_bytes",
        "LLMPROXY_MAX_WS_MESSAGE_BYTES",
        "--max-ws-message-bytes",
        parse_byte_count,
    ),
    Setting(
        "max_concurrent_requests",
        "LLMPROXY_MAX_CONCURRENT_REQUESTS",
        "--max-concurrent-requests",
        parse_max_concurrent,
    ),
    Setting("log_format", "LLMPROXY_LOG_FORMAT", "--log-format", parse_log_format),
    Setting("drain_timeout", "LLMPROXY_DRAIN_TIMEOUT", "--drain-timeout", parse_timeout),
    Setting(
        "client_header_timeout",
        "LLMPROXY_CLIENT_HEADER_TIMEOUT",
        "--client-header-timeout",
        parse_timeout,
    ),
    Setting(
        "client_body_timeout",
        "LLMPROXY_CLIENT_BODY_TIMEOUT",
        "--client-body-timeout",
        parse_timeout,
    ),
    Setting("upstream_proxy", "LLMPROXY_UPSTREAM_PROXY", "--upstream-proxy", parse_upstream_proxy),
    Setting(
        "upstream_ca_bundle", "LLMPROXY_UPSTREAM_CA_BUNDLE", "--upstream-ca-bundle", parse_pem_file
    ),
    Setting(
        "upstream_client_cert",
        "LLMPROXY_UPSTREAM_CLIENT_CERT",
        "--upstream-client-cert",
        parse_pem_file,
    ),
    Setting(
        "upstream_client_key",
        "LLMPROXY_UPSTREAM_CLIENT_KEY",
        "--upstream-client-key",
        parse_pem_file,
    ),
    Setting("redis_url", "LLMPROXY_REDIS_URL", "--redis-url", parse_redis_url),
    Setting("redis_timeout", "LLMPROXY_REDIS_TIMEOUT", "--redis-timeout", parse_timeout),
    Setting("redis_failure", "LLMPROXY_REDIS_FAILURE", "--redis-failure", parse_redis_failure),
    Setting("usage_injection", "LLMPROXY_USAGE_INJECTION", "--usage-injection", parse_bool),
    Setting("host", "LLMPROXY_HOST", "--host", parse_host),
    Setting("port", "LLMPROXY_PORT", "--port", parse_port),
    Setting("workers", "LLMPROXY_WORKERS", "--workers", parse_workers),
)

# The file says `upstream_url` (as the variable does); the object holds a tuple of them.
_FILE_KEYS = {setting.field: setting for setting in SETTINGS} | {
    "upstream_url": SETTINGS[0],
    "upstream_headers": next(s for s in SETTINGS if s.field == "upstream_headers_by_url"),
    "access_keys_file": next(s for s in SETTINGS if s.field == "access_keys_from_file"),
    "keys": next(s for s in SETTINGS if s.field == "named_keys"),
    "keys_file": next(s for s in SETTINGS if s.field == "named_keys_from_file"),
}
del _FILE_KEYS["upstream_urls"], _FILE_KEYS["upstream_headers_by_url"]
del _FILE_KEYS["access_keys_from_file"], _FILE_KEYS["named_keys"]
del _FILE_KEYS["named_keys_from_file"]


def read_config_file(path: str) -> dict[str, tuple[str, object]]:
    """The TOML file's settings, keyed by Configuration field: (label for errors, value)."""
    label = f"--config {path}"
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise ConfigurationError(label, f"cannot be read ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(label, f"is not valid TOML ({error})") from None
    values: dict[str, tuple[str, object]] = {}
    for key, value in document.items():
        setting = _FILE_KEYS.get(key)
        if setting is None:
            known = ", ".join(sorted(_FILE_KEYS))
            raise ConfigurationError(f"{key} in {path}", f"unknown setting (known: {known})")
        values[setting.field] = (f"{key} in {path}", value)
    return values


def load_configuration(
    environ: Mapping[str, str],
    flags: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Configuration:
    """Build the configuration; `flags` are keyed by Configuration field, as strings.

    Raises ConfigurationError naming the first setting that cannot be used.
    """
    flags = flags or {}
    config_file = config_file or environ.get(CONFIG_FILE_ENV) or None
    file_values: dict[str, tuple[str, object]] = (
        read_config_file(config_file) if config_file else {}
    )
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw: object
        if setting.field in flags and setting.flag is not None:
            label, raw = setting.flag, flags[setting.field]
        elif setting.env and setting.env in environ:
            label, raw = setting.env, environ[setting.env]
        elif setting.field in file_values:
            label, raw = file_values[setting.field]
        else:
            continue
        try:
            values[setting.field] = setting.parse(raw)
        except ValueError as error:
            raise ConfigurationError(label, str(error)) from None
    values["proxy_environment"] = tuple(
        (name, environ[name]) for name in PROXY_VARIABLES if name in environ
    )
    configuration = Configuration(**values)
    for url in configuration.upstream_urls:
        if points_at_itself(url, configuration.host, configuration.port):
            raise ConfigurationError(
                _label_of("upstream_urls", flags, environ, file_values),
                f"{url!r} points back at the proxy itself ({configuration.host}:"
                f"{configuration.port}); every request would loop",
            )
    for url, _ in configuration.upstream_headers_by_url:
        if url not in configuration.upstream_urls:
            label = file_values["upstream_headers_by_url"][0]
            raise ConfigurationError(label, f"{url!r} is not one of the upstream URLs")
    _check_keys_distinct(configuration, flags, environ, file_values)
    for url in configuration.upstream_urls:
        try:
            configuration.egress_proxy(url)
        except ValueError as error:
            scheme = urlsplit(url).scheme
            label = (
                _label_of("upstream_proxy", flags, environ, file_values)
                if configuration.upstream_proxy is not None
                else proxy_variable_in_use(scheme, environ)
            )
            raise ConfigurationError(label, str(error)) from None
    try:  # built here once to validate; the proxy builds its own at start-up
        upstream_ssl_context(
            configuration.upstream_ca_bundle,
            configuration.upstream_client_cert,
            configuration.upstream_client_key,
        )
    except TlsFileError as error:
        raise ConfigurationError(
            _label_of(error.setting, flags, environ, file_values), str(error)
        ) from None
    if (
        configuration.workers > 1
        and configuration.redis_url is None
        and any(key.limits.any for key in configuration.proxy_access_keys())
    ):
        raise ConfigurationError(
            _label_of("workers", flags, environ, file_values),
            "per-key limits with several workers need LLMPROXY_REDIS_URL: each worker would "
            "otherwise allow the whole limit",
        )
    return configuration


def _check_keys_distinct(
    configuration: Configuration,
    flags: Mapping[str, str],
    environ: Mapping[str, str],
    file_values: Mapping[str, tuple[str, object]],
) -> None:
    """No key (given by value or by digest) in two places, no table name twice."""
    seen: dict[bytes, str] = {}
    for field_name in ("access_keys", "access_keys_from_file"):
        label = _label_of(field_name, flags, environ, file_values)
        for key in unnamed_keys(getattr(configuration, field_name)):
            seen.setdefault(key.sha256, f"a key of {label}")
    for field_name in ("named_keys", "named_keys_from_file"):
        try:
            seen = check_distinct(getattr(configuration, field_name), seen)
        except ValueError as error:
            raise ConfigurationError(
                _label_of(field_name, flags, environ, file_values), str(error)
            ) from None


_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"})


def points_at_itself(url: str, host: str, port: int) -> bool:
    """Whether an upstream URL is the proxy's own listening address (a forwarding loop)."""
    parts = urlsplit(url)
    upstream_port = parts.port or (443 if parts.scheme == "https" else 80)
    if port == 0 or upstream_port != port:
        return False
    hostname = (parts.hostname or "").lower()
    if hostname == host.lower():
        return True
    # Listening on loopback or on every interface: any loopback name reaches the proxy.
    return hostname in _LOCAL_HOSTS and host in _LOCAL_HOSTS


def _label_of(
    field_name: str,
    flags: Mapping[str, str],
    environ: Mapping[str, str],
    file_values: Mapping[str, tuple[str, object]],
) -> str:
    """How the user spelled the setting that gave `field_name` its value."""
    setting = next(s for s in SETTINGS if s.field == field_name)
    if field_name in flags and setting.flag is not None:
        return setting.flag
    if setting.env in environ:
        return setting.env
    if field_name in file_values:
        return file_values[field_name][0]
    return setting.env


def get_configuration() -> Configuration:
    """The configuration of this process: environment, plus the file named by LLMPROXY_CONFIG.

    The app obtains it through FastAPI's dependency mechanism (tests replace it with
    `app.dependency_overrides[get_configuration]`). `llmproxy serve` exports its flags as
    LLMPROXY_* variables first, so every worker process resolves the same configuration.
    """
    return load_configuration(os.environ)
