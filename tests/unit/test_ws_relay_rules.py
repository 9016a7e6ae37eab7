"""The WebSocket relay's pure rules (DESIGN §10, issue 12): which close each side hears, how a
text message is counted, and which offered subprotocol proved the client.

Codes are drawn from what can reach each rule: a client's close code as the ASGI server reports
it (any code a close frame may carry, 1005 for an empty one, 1006 for a lost connection), and
the upstream's close frames as `websockets` parses them.
"""

from __future__ import annotations

from hypothesis import assume, example, given
from hypothesis import strategies as st
from websockets.frames import EXTERNAL_CLOSE_CODES, Close

from llmproxy.access import KEY_SUBPROTOCOL_PREFIX, AccessKey, KeyRing, key_digest
from llmproxy.ws_relay import close_towards_client, close_towards_upstream, text_size

GOING_AWAY = 1001
NO_STATUS = 1005
CONNECTION_LOST = 1006
MESSAGE_TOO_BIG = 1009
BAD_GATEWAY = 1014


def sendable(code: int) -> bool:
    """Whether RFC 6455 §7.4 lets an endpoint put `code` in a close frame."""
    return code in EXTERNAL_CLOSE_CODES or 3000 <= code < 5000


# A close frame's payload is at most 125 bytes: a 2-byte code and up to 123 bytes of UTF-8.
reasons = st.text(max_size=40).filter(lambda reason: len(reason.encode()) <= 123)
sendable_codes = st.integers(1000, 4999).filter(sendable)
# Everything the ASGI server can report as the client's close code.
client_codes = st.one_of(sendable_codes, st.sampled_from([NO_STATUS, CONNECTION_LOST]))
# The close frames websockets can hand over: any sendable code, or an empty frame (1005, "").
close_frames = st.one_of(st.builds(Close, sendable_codes, reasons), st.just(Close(NO_STATUS, "")))
sent_frames = st.one_of(st.none(), close_frames)


# -- close_towards_upstream ------------------------------------------------------------------


@given(code=sendable_codes, reason=reasons)
@example(code=1000, reason="")
@example(code=4999, reason="bye")
def test_a_clients_own_close_reaches_the_upstream_unchanged(code: int, reason: str) -> None:
    assert close_towards_upstream(code, reason, server_closed=False) == (code, reason)


@given(reason=reasons)
def test_a_client_that_vanished_is_going_away_for_the_upstream(reason: str) -> None:
    assert close_towards_upstream(CONNECTION_LOST, reason, server_closed=False) == (GOING_AWAY, "")


@given(code=client_codes, reason=reasons)
@example(code=MESSAGE_TOO_BIG, reason="Message too big")
@example(code=NO_STATUS, reason="")
def test_a_client_the_proxy_closed_is_going_away_for_the_upstream(code: int, reason: str) -> None:
    # Its message was over the limit (1009 to the client) or it broke the protocol (1002):
    # the upstream must not hear the proxy's code as if the client had sent it.
    assert close_towards_upstream(code, reason, server_closed=True) == (GOING_AWAY, "")


def test_an_empty_close_from_the_client_is_an_empty_close_to_the_upstream() -> None:
    assert close_towards_upstream(NO_STATUS, "", server_closed=False) == (None, "")


@given(code=client_codes, reason=reasons, server_closed=st.booleans())
def test_the_upstream_always_gets_a_close_it_can_be_sent(
    code: int, reason: str, server_closed: bool
) -> None:
    upstream_code, upstream_reason = close_towards_upstream(code, reason, server_closed)
    if upstream_code is None:
        assert upstream_reason == ""
    else:
        Close(upstream_code, upstream_reason).serialize()  # raises on a code no frame may carry


# -- close_towards_client --------------------------------------------------------------------


@given(received=close_frames, sent=sent_frames)
@example(received=Close(4001, "reason"), sent=Close(4001, "reason"))
@example(received=Close(1000, ""), sent=None)
def test_the_upstreams_own_close_reaches_the_client_unchanged(
    received: Close, sent: Close | None
) -> None:
    # `sent` is the proxy's echo of the upstream's close, or nothing yet: either way the
    # upstream spoke first.
    expected = (None, "") if received.code == NO_STATUS else (received.code, received.reason)
    assert close_towards_client(received, sent, proxy_closed_first=False) == expected


@given(received=st.one_of(st.none(), close_frames))
def test_an_upstream_message_over_the_limit_is_the_upstream_going_away(
    received: Close | None,
) -> None:
    # The proxy closed the upstream with 1009; whatever the upstream answered, the client
    # hears that its peer went away, not the proxy's code.
    sent = Close(MESSAGE_TOO_BIG, "over the limit")
    assert close_towards_client(received, sent, proxy_closed_first=True) == (GOING_AWAY, "")
    if received is None:
        assert close_towards_client(None, sent, proxy_closed_first=False) == (GOING_AWAY, "")


@given(sent=sent_frames)
def test_an_upstream_connection_lost_without_a_close_is_a_bad_gateway(sent: Close | None) -> None:
    assume(sent is None or sent.code != MESSAGE_TOO_BIG)
    assert close_towards_client(None, sent, proxy_closed_first=False) == (BAD_GATEWAY, "")


@given(received=close_frames, sent=close_frames)
def test_a_close_the_proxy_began_for_another_reason_is_a_bad_gateway(
    received: Close, sent: Close
) -> None:
    # A protocol error or a keepalive timeout: the upstream's reply to the proxy's close is not
    # the upstream's own word to the client.
    assume(sent.code != MESSAGE_TOO_BIG)
    assert close_towards_client(received, sent, proxy_closed_first=True) == (BAD_GATEWAY, "")


@given(received=st.one_of(st.none(), close_frames), sent=sent_frames, first=st.booleans())
def test_the_client_always_gets_a_close_it_can_be_sent(
    received: Close | None, sent: Close | None, first: bool
) -> None:
    code, reason = close_towards_client(received, sent, first)
    if code is None:
        assert reason == ""
    else:
        Close(code, reason).serialize()


# -- text_size -------------------------------------------------------------------------------


@given(text=st.text())
@example(text="")
@example(text="plain ascii")
@example(text="é")  # 2 bytes
@example(text="€")  # 3 bytes
@example(text="🎧 realtime")  # 4 bytes, outside the BMP
def test_text_size_is_the_utf8_length(text: str) -> None:
    assert text_size(text) == len(text.encode("utf-8"))


# -- authenticate_subprotocols ---------------------------------------------------------------

# RFC 6455 §4.1: a subprotocol is a token (RFC 7230 tchar); keys appear inside one.
TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
tokens = st.text(TCHAR, min_size=1, max_size=24)
keys = st.lists(tokens, min_size=1, max_size=3, unique=True)


def key_subprotocol(key: str) -> str:
    return KEY_SUBPROTOCOL_PREFIX + key


def authenticate_subprotocols(offered: list[str], configured: list[bytes]) -> list[str] | None:
    """The subprotocols a key ring of `configured` keys leaves, None if none proved a key."""
    ring = KeyRing(
        AccessKey(f"key{n}", key_digest(key.decode())) for n, key in enumerate(configured)
    )
    found = ring.authenticate_subprotocols(offered)
    return None if found is None else found[1]


@st.composite
def offers(draw: st.DrawFn) -> tuple[list[str], list[bytes], list[str]]:
    """(configured keys, offered subprotocols, those not carrying a valid key in order)."""
    valid = draw(keys)
    wrong = tokens.filter(lambda key: key not in valid)
    others = st.one_of(
        tokens.filter(lambda name: not name.startswith(KEY_SUBPROTOCOL_PREFIX)),
        st.sampled_from(["realtime", "openai-beta.realtime-v1"]),
        wrong.map(key_subprotocol),  # looks like a key, is not one
        st.sampled_from(valid),  # a valid key, but not as a key subprotocol
    )
    kept = draw(st.lists(others, max_size=5))
    return valid, [key.encode() for key in valid], kept


@given(offer=offers(), data=st.data())
def test_the_valid_key_subprotocol_is_removed_and_nothing_else(
    offer: tuple[list[str], list[bytes], list[str]], data: st.DataObject
) -> None:
    valid, configured, kept = offer
    position = data.draw(st.integers(0, len(kept)), label="position")
    key = data.draw(st.sampled_from(valid), label="key")
    offered = [*kept[:position], key_subprotocol(key), *kept[position:]]
    assert authenticate_subprotocols(offered, configured) == kept


@given(offer=offers())
def test_without_a_valid_key_subprotocol_there_is_no_proof(
    offer: tuple[list[str], list[bytes], list[str]],
) -> None:
    _, configured, offered = offer
    assert authenticate_subprotocols(offered, configured) is None


@given(offer=offers(), data=st.data())
def test_every_subprotocol_carrying_a_valid_key_is_removed(
    offer: tuple[list[str], list[bytes], list[str]], data: st.DataObject
) -> None:
    valid, configured, kept = offer
    carrying = data.draw(st.lists(st.sampled_from(valid), min_size=1, max_size=3), label="keys")
    offered = data.draw(st.permutations([*kept, *map(key_subprotocol, carrying)]), label="order")
    remaining = [name for name in offered if name not in set(map(key_subprotocol, valid))]
    assert authenticate_subprotocols(offered, configured) == remaining


def test_a_key_looking_subprotocol_with_a_wrong_key_is_kept() -> None:
    configured = [b"sk-proxy-right"]
    offered = [
        key_subprotocol("sk-proxy-wrong"),
        "realtime",
        key_subprotocol("sk-proxy-right"),
        key_subprotocol("sk-proxy-right-and-more"),
        key_subprotocol("sk-proxy-righ"),
        KEY_SUBPROTOCOL_PREFIX,
    ]
    assert authenticate_subprotocols(offered, configured) == [
        key_subprotocol("sk-proxy-wrong"),
        "realtime",
        key_subprotocol("sk-proxy-right-and-more"),
        key_subprotocol("sk-proxy-righ"),
        KEY_SUBPROTOCOL_PREFIX,
    ]


def test_a_wrong_key_alone_proves_nothing() -> None:
    configured = [b"sk-proxy-right"]
    assert authenticate_subprotocols([key_subprotocol("sk-proxy-wrong")], configured) is None
    assert authenticate_subprotocols(["realtime", "sk-proxy-right"], configured) is None
    assert authenticate_subprotocols([], configured) is None


def test_any_of_several_configured_keys_proves_the_client() -> None:
    configured = [b"key-one", b"key-two"]
    offered = ["realtime", key_subprotocol("key-two")]
    assert authenticate_subprotocols(offered, configured) == ["realtime"]
    ring = KeyRing(
        [AccessKey("one", key_digest("key-one")), AccessKey("two", key_digest("key-two"))]
    )
    found = ring.authenticate_subprotocols(offered)
    assert found is not None
    assert found[0].name == "two"
