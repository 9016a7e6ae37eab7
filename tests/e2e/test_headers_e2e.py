"""Request headers through the real proxy, as the fake upstream's echo saw them (DESIGN §3.2).

The merge rule: drop hop-by-hop headers and every name a client's `Connection` lists (plus
`Host` and `Content-Length`, which the proxy's own client sets); then the defaults, each exactly
once, replacing every client value of the same name whatever its case or count; then every
other client header, in order, repeats kept. `expected_upstream_headers` below restates it
independently of `llmproxy.headers`, so the test checks the behaviour, not the code.
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import Target, start_proxy
from tests.e2e.fake_client import FakeUpstreamClient
from tests.e2e.sse_events import CHAT_PATH

pytestmark = pytest.mark.e2e

Headers = list[tuple[str, str]]

# RFC 9110 §7.6.1, as DESIGN §3.2 lists them.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
SET_BY_PROXY_CLIENT = frozenset({"host", "content-length"})
ECHO = ("x-fake-scenario", "echo")
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"echo"}]}'


def expected_upstream_headers(
    client: Sequence[tuple[str, str]], defaults: Sequence[tuple[str, str]]
) -> tuple[Headers, Headers]:
    """(defaults, other client headers) as the upstream must see them, names lowercased."""
    listed = {
        token.strip().lower()
        for name, value in client
        if name.lower() == "connection"
        for token in value.split(",")
    }
    default_names = {name.lower() for name, _ in defaults}
    dropped = HOP_BY_HOP | listed | SET_BY_PROXY_CLIENT | default_names
    kept = [(name.lower(), value) for name, value in client if name.lower() not in dropped]
    return [(name.lower(), value) for name, value in defaults], kept


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    # One client for the module: building one costs ~90 ms (its TLS context), per example.
    with httpx.Client(timeout=10.0) as client:
        yield client


def echo_through(
    http: httpx.Client, proxy_url: str, headers: Sequence[tuple[str, str]]
) -> tuple[Headers, Headers]:
    """POST with exactly `headers` (plus httpx's own); return (what the client sent, what the
    upstream received), both as (name, value) lists in order."""
    request = http.build_request(
        "POST", f"{proxy_url}{CHAT_PATH}", content=BODY, headers=[ECHO, *headers]
    )
    sent = [(name.decode(), value.decode()) for name, value in request.headers.raw]
    response = http.send(request)
    assert response.status_code == 200, response.text
    echo: dict[str, Any] = response.json()
    assert echo["body_length"] == len(BODY)
    return sent, [(name, value) for name, value in echo["headers"]]


def values_of(headers: Headers, name: str) -> list[str]:
    return [value for header, value in headers if header.lower() == name.lower()]


def assert_merge_rule(
    sent: Headers, received: Headers, defaults: Sequence[tuple[str, str]], upstream_url: str
) -> None:
    expected_defaults, expected_others = expected_upstream_headers(sent, defaults)
    for name, value in expected_defaults:
        assert values_of(received, name) == [value], f"default {name!r}"
    default_names = {name for name, _ in expected_defaults}
    others = [
        (name, value)
        for name, value in received
        if name not in default_names and name not in SET_BY_PROXY_CLIENT
    ]
    if not any(name.lower() == "x-request-id" for name, _ in sent):
        # llmproxy sends a request id of its own upstream when the client sent none.
        assert len(values_of(others, "x-request-id")) <= 1
        others = [(name, value) for name, value in others if name != "x-request-id"]
    assert others == expected_others
    assert values_of(received, "host") == [urlsplit(upstream_url).netloc]
    assert values_of(received, "content-length") == [str(len(BODY))]


# --- examples -----------------------------------------------------------------------------------


@pytest.fixture
def defaults(target: Target) -> dict[str, str]:
    if not target.default_headers:
        pytest.skip("the proxy under test has no default headers (--proxy-default-headers)")
    return target.default_headers


def random_case(name: str, flips: int) -> str:
    return "".join(c.upper() if (flips >> i) & 1 else c.lower() for i, c in enumerate(name))


def test_defaults_win_whatever_the_client_casing_and_count(
    http: httpx.Client, target: Target, fake: FakeUpstreamClient, defaults: dict[str, str]
) -> None:
    client_headers = []
    for index, name in enumerate(defaults):
        client_headers += [
            (random_case(name, 0b1010101010101 + index), f"client-{index}-a"),
            (name.upper(), f"client-{index}-b"),
            (name.lower(), f"client-{index}-c"),
        ]
    client_headers += [("aUtHoRiZaTiOn", "Bearer client-key"), ("x-client-only", "kept")]
    client_headers += [("openai-organization", "org-1"), ("OpenAI-Organization", "org-2")]
    sent, received = echo_through(http, target.proxy_url, client_headers)
    for name, value in defaults.items():
        assert values_of(received, name) == [value]
    assert not any(value.startswith("client-") for _, value in received)
    assert values_of(received, "x-client-only") == ["kept"]
    assert_merge_rule(sent, received, list(defaults.items()), fake.base_url)


def test_hop_by_hop_and_connection_listed_headers_do_not_reach_the_upstream(
    http: httpx.Client, target: Target, fake: FakeUpstreamClient
) -> None:
    hop = [
        ("Connection", "x-secret-hop, keep-alive"),
        ("Connection", "X-Second-List"),
        ("X-Secret-Hop", "must not pass"),
        ("x-second-list", "must not pass"),
        ("Keep-Alive", "timeout=5, max=100"),
        ("TE", "trailers"),
        ("Trailer", "x-checksum"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authenticate", "Basic"),
        ("X-End-To-End", "passes"),
        ("x-repeated", "first"),
        ("X-Repeated", "second"),
        ("x-repeated", "third"),
    ]
    sent, received = echo_through(http, target.proxy_url, hop)
    names = {name for name, _ in received}
    for name in ("x-secret-hop", "x-second-list", *HOP_BY_HOP):
        assert name not in names
    assert values_of(received, "x-end-to-end") == ["passes"]
    assert values_of(received, "x-repeated") == ["first", "second", "third"]
    assert_merge_rule(sent, received, list(target.default_headers.items()), fake.base_url)


def test_an_h2c_upgrade_offer_is_ignored_and_the_body_forwarded(
    request: pytest.FixtureRequest, target: Target, fake: FakeUpstreamClient
) -> None:
    # What `curl --http2 http://...`, Java's HttpClient and Ktor send by default. RFC 9110 §7.8:
    # a server may ignore the offer; it must still read the request it came with.
    # uvicorn's httptools protocol dropped that body (Kludex/uvicorn#2722); llmproxy.protocol
    # delivers it.
    offer = [
        ("Connection", "Upgrade, HTTP2-Settings"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
    ]
    with httpx.Client(timeout=10.0) as client:
        sent, received = echo_through(client, target.proxy_url, offer)
    assert_merge_rule(sent, received, list(target.default_headers.items()), fake.base_url)


def test_connection_cannot_remove_a_default(
    http: httpx.Client, target: Target, fake: FakeUpstreamClient, defaults: dict[str, str]
) -> None:
    listing = ", ".join(name.lower() for name in defaults)
    sent, received = echo_through(http, target.proxy_url, [("Connection", listing)])
    for name, value in defaults.items():
        assert values_of(received, name) == [value]
    assert_merge_rule(sent, received, list(defaults.items()), fake.base_url)


def test_host_is_the_upstreams(
    http: httpx.Client, target: Target, fake: FakeUpstreamClient
) -> None:
    _, received = echo_through(http, target.proxy_url, [("Host", "evil.example:6666")])
    assert values_of(received, "host") == [urlsplit(fake.url).netloc]


def test_sdk_stainless_headers_arrive(sdk: openai.OpenAI, fake: FakeUpstreamClient) -> None:
    sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    (entry,) = fake.journal()
    received = [(name, value) for name, value in entry["headers"]]
    assert values_of(received, "x-stainless-lang") == ["python"]
    assert values_of(received, "x-stainless-package-version") == [openai.__version__]
    assert values_of(received, "x-stainless-retry-count") == ["0"]
    for suffix in ("os", "arch", "runtime", "runtime-version"):
        assert len(values_of(received, f"x-stainless-{suffix}")) == 1, suffix
    assert values_of(received, "content-type") == ["application/json"]


def test_sdk_api_key_is_replaced_by_the_default(
    sdk: openai.OpenAI, fake: FakeUpstreamClient, defaults: dict[str, str]
) -> None:
    authorization = {k.lower(): v for k, v in defaults.items()}.get("authorization")
    if authorization is None:
        pytest.skip("the proxy under test has no default Authorization")
    sdk.models.list()
    (entry,) = fake.journal()
    assert values_of(entry["headers"], "authorization") == [authorization]


# --- properties through the real servers ------------------------------------------------------

TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
# Names the client cannot send freely: framing the servers interpret themselves, and the
# fake upstream's own scripting headers.
RESERVED = frozenset({"host", "content-length", "transfer-encoding", "expect", "x-fake-scenario"})
RESERVED |= {"x-fake-script"}
KNOWN_DEFAULT_NAMES = ("Authorization", "OpenAI-Organization", "OpenAI-Project", "X-Proxy-Default")
CLIENT_HOP_NAMES = (  # not Transfer-Encoding: it would change the request's own framing
    "Keep-Alive",
    "Proxy-Connection",
    "Proxy-Authorization",
    "Proxy-Authenticate",
    "TE",
    "Trailer",
    "Upgrade",
)

token_names = st.text(TOKEN_CHARS, min_size=1, max_size=12).filter(
    lambda name: name.lower() not in RESERVED
)
values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24).map(str.strip)


def in_random_case(names: Sequence[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(list(names)).flatmap(
        lambda name: st.tuples(*(st.sampled_from([c.lower(), c.upper()]) for c in name)).map(
            "".join
        )
    )


def client_header_sets(default_names: Sequence[str]) -> st.SearchStrategy[Headers]:
    """Client headers in any order: names repeated with several values, and `Connection`
    headers that mostly list names present in the set (or defaults, or connection options)."""
    names = st.one_of(
        in_random_case([*KNOWN_DEFAULT_NAMES, *default_names]),
        in_random_case(CLIENT_HOP_NAMES),
        token_names,
    )
    groups = st.lists(st.tuples(names, st.lists(values, min_size=1, max_size=3)), max_size=5)

    def add_connection_headers(groups: list[tuple[str, list[str]]]) -> st.SearchStrategy[Headers]:
        plain = [(name, value) for name, group in groups for value in group]
        listable = [name for name, _ in plain] + [*KNOWN_DEFAULT_NAMES, "keep-alive", "close"]
        # `Connection: upgrade` with an `Upgrade` header loses the body in uvicorn's httptools
        # protocol, before the proxy sees the request: a bug of its own, pinned by
        # test_an_h2c_upgrade_offer_is_ignored_and_the_body_forwarded.
        listable = [name for name in listable if name.lower() != "upgrade"]
        tokens = st.lists(in_random_case(listable), min_size=1, max_size=4)
        listing = st.tuples(tokens, st.sampled_from([",", ", ", " ,"])).map(
            lambda parts: parts[1].join(parts[0])
        )
        connection = st.lists(st.tuples(in_random_case(["Connection"]), listing), max_size=2)
        return connection.flatmap(lambda headers: st.permutations(plain + headers))

    return groups.flatmap(add_connection_headers)


def default_header_sets() -> st.SearchStrategy[Headers]:
    names = st.one_of(
        in_random_case(KNOWN_DEFAULT_NAMES),
        token_names.filter(lambda name: name.lower() not in HOP_BY_HOP),
    )
    return st.lists(
        st.tuples(names, values), max_size=5, unique_by=lambda header: header[0].lower()
    )


# No shrink phase: every example is a real round trip (or a proxy start), and shrinking one
# failure would run for minutes, past the suite's timeout; the examples are small enough to
# read as they are.
PROPERTY_PHASES = (Phase.explicit, Phase.reuse, Phase.generate)


@given(data=st.data())
@settings(
    max_examples=25,
    deadline=None,
    phases=PROPERTY_PHASES,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_merge_rule_property_with_the_proxys_defaults(
    http: httpx.Client, target: Target, data: st.DataObject
) -> None:
    client = data.draw(client_header_sets(list(target.default_headers)), label="client headers")
    sent, received = echo_through(http, target.proxy_url, client)
    assert_merge_rule(sent, received, list(target.default_headers.items()), target.fake.base_url)


@given(data=st.data())
@settings(
    max_examples=12,
    deadline=None,
    phases=PROPERTY_PHASES,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_merge_rule_property_with_generated_defaults(
    http: httpx.Client, target: Target, data: st.DataObject
) -> None:
    # One proxy per example: defaults are fixed at start-up (~0.2 s each, mostly shutdown).
    if not target.self_hosted:
        pytest.skip("needs a proxy started by the suite")
    defaults = data.draw(default_header_sets(), label="default headers")
    client = data.draw(client_header_sets([name for name, _ in defaults]), label="client headers")
    with start_proxy(target.fake.base_url, default_headers=tuple(defaults)) as proxy:
        sent, received = echo_through(http, proxy.url, client)
    assert_merge_rule(sent, received, defaults, target.fake.base_url)
