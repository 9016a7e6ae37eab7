"""Header policy (DESIGN §3.2, §4.1): properties over any client and default header sets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.headers import (
    CLIENT_SET_REQUEST_HEADERS,
    HOP_BY_HOP_HEADERS,
    connection_listed_names,
    filter_response_headers,
    merge_upstream_headers,
)

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
INTERESTING_NAMES = [
    "Authorization",
    "OpenAI-Organization",
    "X-Api-Key",
    "Content-Type",
    "Accept",
    "X-Stainless-Lang",
    *HOP_BY_HOP_HEADERS,
    *CLIENT_SET_REQUEST_HEADERS,
]


def random_case(draw: st.DrawFn, name: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if flip else c.lower() for c, flip in zip(name, flips, strict=True))


@st.composite
def header_names(draw: st.DrawFn) -> str:
    name = draw(
        st.one_of(st.sampled_from(INTERESTING_NAMES), st.text(TOKEN_CHARS, min_size=1, max_size=12))
    )
    return random_case(draw, name)


header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=0, max_size=20
)


@st.composite
def connection_header(draw: st.DrawFn) -> tuple[str, str]:
    listed = draw(st.lists(header_names(), min_size=0, max_size=3))
    return (random_case(draw, "connection"), ", ".join(listed))


client_header_lists = st.lists(
    st.one_of(st.tuples(header_names(), header_values), connection_header()), max_size=15
)


@st.composite
def default_header_sets(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Defaults as the configuration allows them: no hop-by-hop, no Host/Content-Length."""
    names = draw(st.lists(header_names(), max_size=5, unique_by=str.lower))
    allowed = [
        n
        for n in names
        if n.lower() not in HOP_BY_HOP_HEADERS and n.lower() not in CLIENT_SET_REQUEST_HEADERS
    ]
    return [(name, draw(header_values)) for name in allowed]


@given(client_header_lists, default_header_sets())
def test_every_default_appears_exactly_once_with_its_configured_value(
    client: list[tuple[str, str]], defaults: list[tuple[str, str]]
) -> None:
    merged = merge_upstream_headers(client, defaults)
    for name, value in defaults:
        matching = [(n, v) for n, v in merged if n.lower() == name.lower()]
        assert matching == [(name, value)]


@given(client_header_lists, default_header_sets())
def test_no_hop_by_hop_or_connection_listed_header_survives(
    client: list[tuple[str, str]], defaults: list[tuple[str, str]]
) -> None:
    merged = merge_upstream_headers(client, defaults)
    default_names = {name.lower() for name, _ in defaults}
    listed = connection_listed_names(client) - default_names
    for name, _ in merged:
        assert name.lower() not in HOP_BY_HOP_HEADERS
        assert name.lower() not in CLIENT_SET_REQUEST_HEADERS
        assert name.lower() not in listed


@given(client_header_lists, default_header_sets())
def test_every_other_client_header_survives_in_order(
    client: list[tuple[str, str]], defaults: list[tuple[str, str]]
) -> None:
    merged = merge_upstream_headers(client, defaults)
    removed = (
        {name.lower() for name, _ in defaults}
        | HOP_BY_HOP_HEADERS
        | CLIENT_SET_REQUEST_HEADERS
        | connection_listed_names(client)
    )
    expected = [(n, v) for n, v in client if n.lower() not in removed]
    assert merged[len(defaults) :] == expected


@given(client_header_lists, default_header_sets())
def test_connection_naming_a_default_never_removes_it(
    client: list[tuple[str, str]], defaults: list[tuple[str, str]]
) -> None:
    naming_defaults = ("Connection", ", ".join(name for name, _ in defaults))
    merged = merge_upstream_headers([naming_defaults, *client], defaults)
    assert merged[: len(defaults)] == defaults


# Cases as data (STYLE 7): (client headers, defaults, expected upstream headers).
MERGE_CASES = [
    pytest.param(
        [("authorization", "Bearer client"), ("x-a", "1")],
        [("Authorization", "Bearer default")],
        [("Authorization", "Bearer default"), ("x-a", "1")],
        id="default-replaces-client-value",
    ),
    pytest.param(
        [("AUTHORIZATION", "one"), ("x-b", "2"), ("Authorization", "two")],
        [("authorization", "d")],
        [("authorization", "d"), ("x-b", "2")],
        id="default-replaces-every-repeat-whatever-its-case",
    ),
    pytest.param(
        [("connection", "authorization, x-drop"), ("x-drop", "1"), ("x-keep", "2")],
        [("Authorization", "d")],
        [("Authorization", "d"), ("x-keep", "2")],
        id="connection-authorization-cannot-remove-a-default",
    ),
    pytest.param(
        [("keep-alive", "5"), ("upgrade", "h2c"), ("te", "trailers"), ("transfer-encoding", "x")],
        [],
        [],
        id="hop-by-hop-dropped",
    ),
    pytest.param(
        [("host", "evil.example"), ("content-length", "3"), ("x-a", "1"), ("x-a", "2")],
        [],
        [("x-a", "1"), ("x-a", "2")],
        id="host-and-length-dropped-repeats-kept-in-order",
    ),
    pytest.param(
        [("proxy-authorization", "Basic x"), ("proxy-connection", "keep-alive")],
        [],
        [],
        id="proxy-headers-dropped",
    ),
]


@pytest.mark.parametrize(("client", "defaults", "expected"), MERGE_CASES)
def test_merge_cases(
    client: list[tuple[str, str]],
    defaults: list[tuple[str, str]],
    expected: list[tuple[str, str]],
) -> None:
    assert merge_upstream_headers(client, defaults) == expected


@given(
    st.lists(
        st.tuples(
            header_names().map(str.encode),
            header_values.map(str.encode),
        ),
        max_size=15,
    )
)
def test_response_headers_lose_only_hop_by_hop(headers: list[tuple[bytes, bytes]]) -> None:
    kept = filter_response_headers(headers)
    listed = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    hop = {name.encode() for name in HOP_BY_HOP_HEADERS}
    assert kept == [(n, v) for n, v in headers if n.lower() not in hop and n.lower() not in listed]
    # The forwarder hands over the names the upstream client lowered: the same answer.
    assert filter_response_headers(headers, [n.lower() for n, _ in headers]) == kept


def test_response_headers_pass_rate_limit_and_request_id() -> None:
    headers = [
        (b"x-request-id", b"req_1"),
        (b"retry-after", b"2"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"keep-alive"),
        (b"x-ratelimit-remaining-requests", b"0"),
        (b"Content-Encoding", b"gzip"),
    ]
    assert filter_response_headers(headers) == [
        (b"x-request-id", b"req_1"),
        (b"retry-after", b"2"),
        (b"x-ratelimit-remaining-requests", b"0"),
        (b"Content-Encoding", b"gzip"),
    ]
