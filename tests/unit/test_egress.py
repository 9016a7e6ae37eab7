"""Which egress proxy an upstream goes through (DESIGN §12, issue 14): the NO_PROXY matcher,
the variables' precedence, proxy URLs, and start-up errors that never show credentials."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from llmproxy.config import ConfigurationError, load_configuration
from llmproxy.egress import EgressProxy, bypasses_proxy, parse_proxy_url, proxy_for

PASSWORD = "hunter2-SECRET"

# (host as in the upstream URL, NO_PROXY, bypasses the proxy) — curl's lib/noproxy.c rules.
NO_PROXY_CASES = [
    # Host names: the name itself and its subdomains, with a leading dot or without.
    ("example.com", "example.com", True),
    ("api.example.com", "example.com", True),
    ("a.b.example.com", "example.com", True),
    ("example.com", ".example.com", True),
    ("api.example.com", ".example.com", True),
    # A suffix of the string is not a subdomain.
    ("badexample.com", "example.com", False),
    ("badexample.com", ".example.com", False),
    ("example.com.evil.net", "example.com", False),
    ("example.co", "example.com", False),
    ("com", "example.com", False),
    ("example.com", "api.example.com", False),
    # Case does not matter, on either side.
    ("API.Example.COM", "example.com", True),
    ("api.example.com", "EXAMPLE.Com", True),
    # Trailing dots (fully qualified names) are ignored, on either side.
    ("example.com.", "example.com", True),
    ("api.example.com", "example.com.", True),
    ("api.example.com.", ".example.com.", True),
    # `*` alone: everything, names and addresses alike.
    ("example.com", "*", True),
    ("10.1.2.3", "*", True),
    ("::1", "*", True),
    # IPv4 addresses: the address itself, not a prefix of its text.
    ("192.168.1.10", "192.168.1.10", True),
    ("192.168.1.100", "192.168.1.10", False),
    ("192.168.1.1", "192.168.1.10", False),
    # IPv6 addresses, bracketed or not, in any spelling of the same address.
    ("::1", "::1", True),
    ("[::1]", "::1", True),
    ("::1", "0:0:0:0:0:0:0:1", True),
    ("2001:db8::1", "2001:DB8::1", True),
    ("::2", "::1", False),
    # CIDR ranges, v4 and v6.
    ("10.1.2.3", "10.0.0.0/8", True),
    ("11.0.0.1", "10.0.0.0/8", False),
    ("192.168.1.77", "192.168.1.0/24", True),
    ("192.168.2.1", "192.168.1.0/24", False),
    ("2001:db8:1::5", "2001:db8::/32", True),
    ("2001:db9::1", "2001:db8::/32", False),
    ("fd00::7", "fc00::/7", True),
    # Addresses and names never match each other (no resolving, no loopback magic).
    ("127.0.0.1", "localhost", False),
    ("localhost", "127.0.0.1", False),
    ("localhost", "127.0.0.0/8", False),
    ("10.1.2.3", "::/0", False),
    # An entry with a port names no host (curl has no ports in NO_PROXY): it never matches.
    ("example.com", "example.com:443", False),
    ("10.0.0.1", "10.0.0.1:8080", False),
    # Empty entries and blanks around entries are skipped.
    ("example.com", "", False),
    ("example.com", " , ,", False),
    ("example.com", ",,example.com,,", True),
    ("example.com", "  example.com  ", True),
    ("example.com", "other.org , example.com", True),
    ("example.com", "other.org,\texample.com\t", True),
    ("10.1.2.3", " 10.0.0.0/8 ", True),
    ("other.org", "example.com, other.org", True),
    ("third.net", "example.com, other.org", False),
    # Matches of one kind do not stop the list: later entries are still read.
    ("api.example.com", "10.0.0.0/8,::1,example.com", True),
    ("10.1.2.3", "example.com,::1,10.0.0.0/8", True),
]


@pytest.mark.parametrize(("host", "no_proxy", "bypasses"), NO_PROXY_CASES)
def test_no_proxy_matches_as_curl_does(host: str, no_proxy: str, bypasses: bool) -> None:
    assert bypasses_proxy(host, no_proxy) is bypasses


HTTP_UPSTREAM = "http://llm.internal:8000/v1"
HTTPS_UPSTREAM = "https://api.openai.com/v1"
A = "http://proxy-a.corp:3128"
B = "http://proxy-b.corp:3128"
C = "http://proxy-c.corp:3128"

# (upstream URL, environment, explicit upstream_proxy, the proxy's host or None for direct)
PRECEDENCE_CASES = [
    # Each scheme reads its own variable.
    (HTTPS_UPSTREAM, {"HTTPS_PROXY": A}, None, "proxy-a.corp"),
    (HTTP_UPSTREAM, {"HTTP_PROXY": A}, None, "proxy-a.corp"),
    (HTTPS_UPSTREAM, {"HTTP_PROXY": A}, None, None),
    (HTTP_UPSTREAM, {"HTTPS_PROXY": A}, None, None),
    (HTTPS_UPSTREAM, {"HTTPS_PROXY": A, "HTTP_PROXY": B}, None, "proxy-a.corp"),
    (HTTP_UPSTREAM, {"HTTPS_PROXY": A, "HTTP_PROXY": B}, None, "proxy-b.corp"),
    # Lower case wins over upper case.
    (HTTPS_UPSTREAM, {"https_proxy": A, "HTTPS_PROXY": B}, None, "proxy-a.corp"),
    (HTTPS_UPSTREAM, {"HTTPS_PROXY": B, "https_proxy": A}, None, "proxy-a.corp"),
    (HTTP_UPSTREAM, {"http_proxy": A, "HTTP_PROXY": B}, None, "proxy-a.corp"),
    (HTTPS_UPSTREAM, {"https_proxy": A}, None, "proxy-a.corp"),
    # ALL_PROXY when the scheme's own is unset; the scheme's own (either case) wins over it.
    (HTTPS_UPSTREAM, {"ALL_PROXY": A}, None, "proxy-a.corp"),
    (HTTP_UPSTREAM, {"ALL_PROXY": A}, None, "proxy-a.corp"),
    (HTTP_UPSTREAM, {"all_proxy": A, "ALL_PROXY": B}, None, "proxy-a.corp"),
    (HTTPS_UPSTREAM, {"HTTPS_PROXY": A, "all_proxy": B}, None, "proxy-a.corp"),
    (HTTP_UPSTREAM, {"HTTPS_PROXY": A, "ALL_PROXY": B}, None, "proxy-b.corp"),
    # Nothing set: direct.
    (HTTPS_UPSTREAM, {}, None, None),
    # The explicit setting wins over the environment, and `none` ignores it.
    (HTTPS_UPSTREAM, {"HTTPS_PROXY": A, "ALL_PROXY": B}, C, "proxy-c.corp"),
    (HTTP_UPSTREAM, {}, C, "proxy-c.corp"),
    (HTTPS_UPSTREAM, {"HTTPS_PROXY": A, "https_proxy": A, "ALL_PROXY": B}, "none", None),
    (HTTP_UPSTREAM, {"HTTP_PROXY": A}, "NONE", None),
    # NO_PROXY applies to the environment's proxy and to the explicit one alike.
    (HTTPS_UPSTREAM, {"HTTPS_PROXY": A, "NO_PROXY": "openai.com"}, None, None),
    (HTTP_UPSTREAM, {"HTTP_PROXY": A, "no_proxy": ".internal"}, None, None),
    (HTTPS_UPSTREAM, {"NO_PROXY": "openai.com"}, C, None),
    (HTTPS_UPSTREAM, {"HTTPS_PROXY": A, "NO_PROXY": "llm.internal"}, None, "proxy-a.corp"),
    # no_proxy (lower case) wins over NO_PROXY.
    (
        HTTPS_UPSTREAM,
        {"HTTPS_PROXY": A, "no_proxy": "x.org", "NO_PROXY": "openai.com"},
        None,
        "proxy-a.corp",
    ),
    # No implicit exception for loopback: a local upstream goes through the proxy too.
    ("http://127.0.0.1:8000/v1", {"HTTP_PROXY": A}, None, "proxy-a.corp"),
    ("http://localhost:8000/v1", {"HTTP_PROXY": A}, None, "proxy-a.corp"),
    ("http://[::1]:8000/v1", {"HTTP_PROXY": A}, None, "proxy-a.corp"),
    ("https://127.0.0.1:8443/v1", {"HTTPS_PROXY": A}, None, "proxy-a.corp"),
    # NO_PROXY sees the upstream's host without brackets or port.
    ("http://[::1]:8000/v1", {"HTTP_PROXY": A, "NO_PROXY": "::1"}, None, None),
    ("http://10.0.0.5:8000/v1", {"HTTP_PROXY": A, "NO_PROXY": "10.0.0.0/24"}, None, None),
]


@pytest.mark.parametrize(("upstream", "environ", "explicit", "via"), PRECEDENCE_CASES)
def test_which_proxy_an_upstream_goes_through(
    upstream: str, environ: dict[str, str], explicit: str | None, via: str | None
) -> None:
    proxy = proxy_for(upstream, environ, explicit)
    assert (proxy.host if proxy is not None else None) == via


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode("ascii")


# (proxy URL, host, port, Proxy-Authorization)
PROXY_URLS = [
    ("http://proxy.corp:3128", "proxy.corp", 3128, None),
    ("http://proxy.corp", "proxy.corp", 1080, None),  # curl's default port
    ("http://proxy.corp/", "proxy.corp", 1080, None),
    ("proxy.corp:8080", "proxy.corp", 8080, None),  # a bare host[:port] is an HTTP proxy
    ("proxy.corp", "proxy.corp", 1080, None),
    ("HTTP://Proxy.Corp:3128", "proxy.corp", 3128, None),
    ("  http://proxy.corp:3128  ", "proxy.corp", 3128, None),
    ("http://10.0.0.1:3128", "10.0.0.1", 3128, None),
    ("http://[::1]:3128", "::1", 3128, None),
    ("http://alice:s3cret@proxy.corp:3128", "proxy.corp", 3128, basic("alice:s3cret")),
    # Percent-encoded credentials are decoded before they are encoded as Basic.
    (
        "http://al%40ce:p%40ss%3Aw%2Frd%25@proxy.corp:3128",
        "proxy.corp",
        3128,
        basic("al@ce:p@ss:w/rd%"),
    ),
    ("http://alice@proxy.corp:3128", "proxy.corp", 3128, basic("alice:")),
    ("http://alice:@proxy.corp", "proxy.corp", 1080, basic("alice:")),
    ("alice:s3cret@proxy.corp:8080", "proxy.corp", 8080, basic("alice:s3cret")),
]


@pytest.mark.parametrize(("url", "host", "port", "authorization"), PROXY_URLS)
def test_parse_proxy_url(url: str, host: str, port: int, authorization: str | None) -> None:
    assert parse_proxy_url(url) == EgressProxy(host, port, authorization)


REJECTED_PROXY_URLS = [
    (f"https://alice:{PASSWORD}@proxy.corp:443", "http://"),
    (f"socks5://alice:{PASSWORD}@proxy.corp:1080", "http://"),
    (f"socks5h://alice:{PASSWORD}@proxy.corp:1080", "http://"),
    (f"socks4://alice:{PASSWORD}@proxy.corp:1080", "http://"),
    (f"http://alice:{PASSWORD}@:3128", "host"),
    (f"http://alice:{PASSWORD}@proxy.corp:99999", "port"),
    (f"http://alice:{PASSWORD}@proxy.corp:port", "port"),
]


@pytest.mark.parametrize(("url", "fragment"), REJECTED_PROXY_URLS)
def test_an_unusable_proxy_url_is_refused_in_one_line_without_its_password(
    url: str, fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment) as raised:
        parse_proxy_url(url)
    message = str(raised.value)
    assert "\n" not in message
    assert PASSWORD not in message
    assert "alice" not in message


def test_the_proxys_credentials_are_in_neither_its_repr_nor_its_name() -> None:
    proxy = parse_proxy_url(f"http://alice:{PASSWORD}@proxy.corp:3128")
    encoded = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert proxy.authorization == f"Basic {encoded}"
    for text in (repr(proxy), str(proxy), proxy.shown):
        assert PASSWORD not in text
        assert encoded not in text
    assert proxy.shown == "proxy.corp:3128"
    assert parse_proxy_url("http://[::1]:3128").shown == "[::1]:3128"


# (environment, the setting the error names) — the URLs hold PASSWORD.
BAD_PROXY_SETTINGS = [
    ({"HTTPS_PROXY": f"socks5://alice:{PASSWORD}@proxy.corp:1080"}, "HTTPS_PROXY"),
    ({"https_proxy": f"https://alice:{PASSWORD}@proxy.corp"}, "https_proxy"),
    ({"ALL_PROXY": f"http://alice:{PASSWORD}@proxy.corp:99999"}, "ALL_PROXY"),
    (
        {
            "LLMPROXY_UPSTREAM_URL": "http://llm.internal/v1",
            "HTTP_PROXY": f"socks5://alice:{PASSWORD}@p",
        },
        "HTTP_PROXY",
    ),
    (
        {"LLMPROXY_UPSTREAM_PROXY": f"socks5://alice:{PASSWORD}@proxy.corp"},
        "LLMPROXY_UPSTREAM_PROXY",
    ),
    # The explicit setting is the one used, so its error wins over a good environment's.
    (
        {
            "HTTPS_PROXY": "http://fine.corp:3128",
            "LLMPROXY_UPSTREAM_PROXY": f"https://alice:{PASSWORD}@p",
        },
        "LLMPROXY_UPSTREAM_PROXY",
    ),
]


@pytest.mark.parametrize(("environ", "setting"), BAD_PROXY_SETTINGS)
def test_a_bad_proxy_url_stops_start_up_naming_its_variable(
    environ: dict[str, str], setting: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_configuration(environ)
    message = str(raised.value)
    assert message.startswith(f"{setting}: ")
    assert "\n" not in message
    assert PASSWORD not in message


def test_a_bad_upstream_proxy_flag_or_toml_key_is_named_as_spelled(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_configuration({}, {"upstream_proxy": f"socks5://alice:{PASSWORD}@p"})
    assert str(raised.value).startswith("--upstream-proxy: ")
    assert PASSWORD not in str(raised.value)
    toml = tmp_path / "llmproxy.toml"
    toml.write_text(f'upstream_proxy = "https://alice:{PASSWORD}@p"\n')
    with pytest.raises(ConfigurationError) as raised:
        load_configuration({}, config_file=str(toml))
    assert str(raised.value).startswith(f"upstream_proxy in {toml}: ")
    assert PASSWORD not in str(raised.value)


def test_a_proxy_variable_for_the_other_scheme_is_not_read() -> None:
    # Only https upstreams (the default): a broken HTTP_PROXY is nobody's business.
    configuration = load_configuration({"HTTP_PROXY": "socks5://p:1080"})
    assert configuration.egress_proxy(configuration.upstream_urls[0]) is None


def test_the_configuration_reads_the_environment_once_and_shows_no_credentials() -> None:
    environ = {
        "LLMPROXY_UPSTREAM_URL": "https://api.openai.com/v1,http://llm.internal:8000/v1",
        "https_proxy": f"http://alice:{PASSWORD}@proxy-a.corp:3128",
        "HTTP_PROXY": "http://proxy-b.corp",
        "NO_PROXY": "example.com",
        "PATH": "/usr/bin",
    }
    configuration = load_configuration(environ)
    environ.clear()  # captured at load: later changes do not move the traffic
    openai, internal = configuration.upstream_urls
    assert configuration.egress_proxy(openai) == parse_proxy_url(
        f"http://alice:{PASSWORD}@proxy-a.corp:3128"
    )
    assert configuration.egress_proxy(internal) == EgressProxy("proxy-b.corp", 1080)
    assert PASSWORD not in repr(configuration)
    assert PASSWORD not in str(configuration)


def test_upstream_proxy_setting_wins_and_none_turns_egress_off() -> None:
    environ = {"HTTPS_PROXY": "http://proxy-a.corp:3128"}
    explicit = load_configuration(
        environ | {"LLMPROXY_UPSTREAM_PROXY": f"http://alice:{PASSWORD}@proxy-c.corp:8080"}
    )
    chosen = explicit.egress_proxy(explicit.upstream_urls[0])
    assert chosen is not None
    assert chosen.shown == "proxy-c.corp:8080"
    assert PASSWORD not in repr(explicit)
    off = load_configuration(environ | {"LLMPROXY_UPSTREAM_PROXY": "none"})
    assert off.egress_proxy(off.upstream_urls[0]) is None
    flagged = load_configuration(environ, {"upstream_proxy": "none"})
    assert flagged.egress_proxy(flagged.upstream_urls[0]) is None
    empty = load_configuration(environ | {"LLMPROXY_UPSTREAM_PROXY": ""})  # unset, in effect
    assert empty.egress_proxy(empty.upstream_urls[0]) == EgressProxy("proxy-a.corp", 3128)
