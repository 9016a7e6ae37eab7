"""The upstream client's response parsing, differentially against h11 (issue 10, item 16).

Every response byte sequence here goes to llmproxy's upstream client split at every byte
boundary (short inputs: each single cut, and one byte per read; long inputs: several read
sizes), and whole to h11 (`h11.Connection(h11.CLIENT)`, after a matching request). Both are
normalised to one `Outcome`: accepted (status, headers, body, whether the connection may be
reused), rejected (before or after the head), or still pending when the upstream never closes.

The client must give one outcome for every split, and that outcome must be h11's, unless the
case carries a tag of `KNOWN_DIFFERENCES`: each row there says what differs and why, and
reconciles exactly that difference and no other (a rejection must also give the expected
reason). `test_every_known_difference_is_witnessed` keeps the table honest: a row no shape
needs any more fails it. Known defects are strict-xfail rows of `SHAPES`, with the issue item.

Trailers are compared only for accept/reject: the client discards them by design (the
forwarder has no way to relay them), so they are not part of `Outcome`.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import re
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import h11
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from llmproxy import upstream_client

# The size of one socket read for long inputs, and for h11 always (see `h11_outcome`).
READ = 65536

# Inputs up to this long are split at every single byte boundary, and fed one byte per read.
SHORT = 1024

ACCEPTED, REJECTED, PENDING = "accepted", "rejected", "pending"
HEAD, BODY = "head", "body"


@dataclass(frozen=True)
class Outcome:
    """What a parser made of a response. `detail` (the error text) is not compared."""

    kind: str  # ACCEPTED, REJECTED or PENDING
    stage: str = ""  # REJECTED, PENDING: HEAD (no final head yet) or BODY
    status: int | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()  # names lowercased; ACCEPTED, PENDING body
    body: bytes = b""
    reusable: bool = False  # ACCEPTED: the connection may carry the next request
    detail: str = field(default="", compare=False)

    @classmethod
    def rejected(cls, stage: str, detail: str) -> Outcome:
        return cls(REJECTED, stage, detail=detail)


def normalised(headers: Any) -> tuple[tuple[bytes, bytes], ...]:
    """Header names lowercased, and Transfer-Encoding's value too: h11 lowercases it
    (`_headers.normalize_and_validate`), and transfer-coding names are case-insensitive (RFC
    9112 §7). Nothing else changes: values are compared byte for byte."""
    pairs = ((bytes(name).lower(), bytes(value)) for name, value in headers)
    return tuple(
        (name, value.lower() if name == b"transfer-encoding" else value) for name, value in pairs
    )


# -- llmproxy's client: the one place that knows upstream_client's internals ---------------------


def client_outcomes(
    data: bytes, cut_sets: Sequence[Sequence[int]], method: str = "GET", eof: bool = True
) -> list[Outcome]:
    """The client's outcome for `data` arriving in reads cut at each set of `cut_sets`.

    Sans-I/O: a `_Connection` on a fake transport and pool, the request sent with its `send`,
    each read given to `data_received`, then the upstream's close (`eof_received`,
    `connection_lost`) if `eof`. The reader is the forwarder's: it takes the response as soon
    as `send` returns and each body chunk as soon as it is there, and closes the response once
    the body has ended or failed. Coroutines are stepped by hand, so the outcome does not
    depend on the event loop's scheduling. Reusable means: handed back to the pool, and not
    closed by the time the data has been read (before the upstream's close).
    """

    class Pool:
        released = False

        def release(self, connection: object) -> None:
            self.released = True

        def forget(self, connection: object) -> None:
            pass

    class Transport:
        aborted = False

        def __init__(self) -> None:
            self.written: list[bytes] = []

        def write(self, chunk: bytes) -> None:
            self.written.append(chunk)

        def abort(self) -> None:
            self.aborted = True

        close = abort

        def is_closing(self) -> bool:
            return self.aborted

        def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
            pass

        def get_write_buffer_size(self) -> int:
            return 0  # every write goes out at once

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

    class Step:
        """A coroutine stepped by hand: `step()` is (True, value) once it has returned."""

        def __init__(self, coroutine: Coroutine[Any, Any, Any]) -> None:
            self.coroutine = coroutine
            self.waiting: asyncio.Future[Any] | None = None

        def step(self) -> tuple[bool, Any]:
            if self.waiting is not None and not self.waiting.done():
                return False, None
            try:
                self.waiting = self.coroutine.send(None)
            except StopIteration as returned:
                return True, returned.value
            return False, None

    def one(cuts: Sequence[int]) -> Outcome:
        pool, transport = Pool(), Transport()
        connection = upstream_client._Connection(pool, 3600.0)  # type: ignore[arg-type]
        connection.connection_made(transport)  # type: ignore[arg-type]
        head = f"{method} /v1/models HTTP/1.1\r\nHost: upstream\r\n\r\n".encode()
        sending = Step(connection.send(head, b"", method == "HEAD"))
        assert sending.step() == (False, None), "send returned before any response byte"
        assert b"".join(transport.written) == head
        response: upstream_client.UpstreamResponse | None = None
        reading: Step | None = None
        body = bytearray()
        result: Outcome | None = None

        def advance() -> None:
            nonlocal response, reading, result
            if result is not None:
                return
            if response is None:
                try:
                    done, value = sending.step()
                except upstream_client.UpstreamError as error:
                    result = Outcome.rejected(HEAD, str(error))
                    return
                if not done:
                    return
                response = value
            assert response is not None
            while True:
                if reading is None:
                    reading = Step(response.read_chunk())
                try:
                    done, chunk = reading.step()
                except upstream_client.UpstreamError as error:
                    response.close()
                    result = Outcome.rejected(BODY, str(error))
                    return
                if not done:
                    return
                reading = None
                if not chunk:
                    response.close()
                    headers = normalised(response.raw_headers)
                    result = Outcome(ACCEPTED, "", response.status, headers, bytes(body))
                    return
                body.extend(chunk)

        bounds = [0, *cuts, len(data)]
        for start, end in itertools.pairwise(bounds):
            if transport.aborted:
                break  # a transport delivers nothing after abort()
            connection.data_received(data[start:end])
            advance()
        reusable = pool.released and not transport.aborted
        if transport.aborted or eof:
            if not transport.aborted:
                connection.eof_received()
            connection.connection_lost(None)
            advance()
        if result is None:
            stage = HEAD if response is None else BODY
            headers = () if response is None else normalised(response.raw_headers)
            status = None if response is None else response.status
            connection.abort()  # what the forwarder's timeout does; it fails the waiters
            for waiting in (sending if response is None else reading,):
                try:
                    if waiting is not None:
                        waiting.step()
                except upstream_client.UpstreamError:
                    pass  # the abort's error, taken so that no future holds it unretrieved
            return Outcome(PENDING, stage, status, headers, bytes(body))
        if result.kind == ACCEPTED:
            result = replace(result, reusable=reusable)
        return result

    async def all_cuts() -> list[Outcome]:
        return [one(cuts) for cuts in cut_sets]

    return asyncio.run(all_cuts())


# -- h11 ----------------------------------------------------------------------------------------


def h11_outcome(data: bytes, method: str = "GET", eof: bool = True) -> Outcome:
    """h11's outcome for `data`, given in reads of `READ` bytes.

    h11 bounds only an incomplete event (`max_incomplete_event_size`, here the client's
    `MAX_HEAD_BYTES`): a whole oversize head in one read would pass, so the reads are the size
    a socket gives. Reusable means: the response ended, h11 keeps the connection (`DONE`), and
    no byte followed the message.
    """
    connection = h11.Connection(
        h11.CLIENT, max_incomplete_event_size=upstream_client.MAX_HEAD_BYTES
    )
    connection.send(h11.Request(method=method, target="/v1/models", headers=[("Host", "upstream")]))
    connection.send(h11.EndOfMessage())
    status: int | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body = bytearray()
    ended = False
    reusable = False
    reads = [data[i : i + READ] for i in range(0, len(data), READ)]
    try:
        for index, piece in enumerate([*reads, b""] if eof else reads):
            if piece == b"" and index == len(reads):
                reusable = ended and connection.their_state is h11.DONE
                reusable = reusable and not connection.trailing_data[0]
            connection.receive_data(piece)
            while not ended:
                event = connection.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    break
                if isinstance(event, h11.Response):
                    status = event.status_code
                    headers = normalised(event.headers.raw_items())
                elif isinstance(event, h11.Data):
                    body.extend(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    ended = True
                elif isinstance(event, h11.ConnectionClosed):
                    raise h11.RemoteProtocolError("closed before the response ended")
    except h11.RemoteProtocolError as error:
        return Outcome.rejected(HEAD if status is None else BODY, str(error))
    if not eof:
        reusable = ended and connection.their_state is h11.DONE
        reusable = reusable and not connection.trailing_data[0]
    if ended:
        return Outcome(ACCEPTED, "", status, headers, bytes(body), reusable)
    return Outcome(PENDING, HEAD if status is None else BODY, status, headers, bytes(body))


# -- the known differences ----------------------------------------------------------------------

Reconcile = Callable[[Outcome, Outcome], tuple[Outcome, Outcome]]


@dataclass(frozen=True)
class Difference:
    """Why llmproxy's client and h11 differ on cases with this tag, and exactly how."""

    reason: str
    reconcile: Reconcile  # (client, h11) -> the pair with this one difference taken out
    reuse_depends_on_split: bool = False


def client_rejects(because: str) -> Reconcile:
    """The client rejects (with an error matching `because`) where h11 does not."""
    pattern = re.compile(because)

    def reconcile(client: Outcome, other: Outcome) -> tuple[Outcome, Outcome]:
        if client.kind == REJECTED and other.kind != REJECTED and pattern.search(client.detail):
            return client, client
        return client, other

    return reconcile


def client_rejects_the_head(because: str) -> Reconcile:
    """The client rejects the head (with an error matching `because`) where h11 does not.

    h11 may accept, or reject later in the body: the body of a response refused at its head is
    never compared.
    """
    pattern = re.compile(because)

    def reconcile(client: Outcome, other: Outcome) -> tuple[Outcome, Outcome]:
        if (
            client.kind == REJECTED
            and client.stage == HEAD
            and not (other.kind == REJECTED and other.stage == HEAD)
            and pattern.search(client.detail)
        ):
            return client, client
        return client, other

    return reconcile


def h11_rejects(because: str) -> Reconcile:
    """h11 rejects (with an error matching `because`) where the client does not."""
    pattern = re.compile(because)

    def reconcile(client: Outcome, other: Outcome) -> tuple[Outcome, Outcome]:
        if client.kind != REJECTED and other.kind == REJECTED and pattern.search(other.detail):
            return client, client
        return client, other

    return reconcile


def client_reuses(expected: bool) -> Reconcile:
    """Both accept the same response; only the client's reuse verdict, `expected`, differs."""

    def reconcile(client: Outcome, other: Outcome) -> tuple[Outcome, Outcome]:
        if client.kind == other.kind == ACCEPTED and client.reusable is expected:
            return client, replace(other, reusable=expected)
        return client, other

    return reconcile


def client_keeps_trailing_whitespace(client: Outcome, other: Outcome) -> tuple[Outcome, Outcome]:
    """Values compared without trailing whitespace (h11's have none: a no-op there)."""

    def stripped(outcome: Outcome) -> Outcome:
        headers = tuple((name, value.rstrip(b" \t")) for name, value in outcome.headers)
        return replace(outcome, headers=headers)

    return stripped(client), stripped(other)


KNOWN_DIFFERENCES: dict[str, Difference] = {
    "bare-lf": Difference(
        "A line ended by LF alone: llhttp (strict) rejects it, h11 accepts it. RFC 9112 §2.2 "
        "lets a recipient recognise a bare LF ('MAY'), so both are conformant; rejecting gives "
        "a 502 and leaves no doubt about where a line ends.",
        client_rejects(
            r"Missing expected CR|Invalid header (field|value) char|Invalid response status"
        ),
    ),
    "obs-fold": Difference(
        "A folded header line (obs-fold): llhttp rejects it, h11 unfolds it. RFC 9112 §5.2: "
        "a proxy or gateway receiving obs-fold in a response MUST either discard the message "
        "and answer 502 or replace the fold with SP; llmproxy does the first.",
        client_rejects(r"Unexpected whitespace after header value|Invalid header value char"),
    ),
    "cl-te": Difference(
        "Both Content-Length and Transfer-Encoding: llhttp rejects the message, h11 lets "
        "Transfer-Encoding win. RFC 9112 §6.3 (3) allows either and says such a message "
        "'ought to be handled as an error' (request smuggling, response splitting).",
        client_rejects(r"can't be present with"),
    ),
    "cl-duplicate-same": Difference(
        "Content-Length repeated with one value ('2' twice, or '2, 2'): llhttp rejects it, h11 "
        "takes the single value. RFC 9110 §8.6 lets the recipient either reject the message "
        "or replace the list by the one value.",
        client_rejects(r"Duplicate Content-Length|Invalid character in Content-Length"),
    ),
    "ctl-in-value": Difference(
        "A control byte other than HTAB (0x01-0x08, 0x0E-0x1F, DEL) in a field value: llhttp "
        "rejects it, h11 accepts it (its value pattern is [^\\x00\\s], for obs-text). RFC "
        "9110 §5.5: field-vchar is VCHAR (0x21-0x7E) or obs-text (0x80-0xFF), so h11 is the lax "
        "one; the forwarder would refuse such a value anyway (`headers.has_control_bytes`).",
        client_rejects(r"Invalid header value char"),
    ),
    "trailing-ows": Difference(
        "Whitespace after a field value: h11 strips it, the client keeps it (llhttp strips only "
        "leading OWS) and forwards the value byte for byte. RFC 9110 §5.5 asks to exclude it "
        "'prior to evaluating the field value', and what the proxy evaluates does "
        "(`retry._parse_decimal` strips; a Content-Type prefix test is unaffected).",
        client_keeps_trailing_whitespace,
    ),
    "chunk-size-ows": Difference(
        "Whitespace after a chunk size with no extension ('2 \\r\\n'): llhttp rejects it, h11 "
        "accepts it. RFC 9112 §7.1: chunk = chunk-size [ chunk-ext ] CRLF; whitespace is only "
        "allowed as BWS before ';', so h11 is the lax one.",
        client_rejects(r"Invalid character in chunk size"),
    ),
    "chunk-ext-bws": Difference(
        "Whitespace inside a chunk extension ('2; a', '2;a =b'): llhttp rejects it, h11 "
        "accepts it. This is a deviation of llhttp's: RFC 9112 §7.1.1 has BWS there, and RFC "
        "9110 §5.6.3 says a recipient MUST accept and remove BWS. Kept because senders MUST "
        "NOT generate BWS, no llhttp leniency covers it, and the failure is a clean error.",
        client_rejects(r"Invalid character in chunk extensions"),
    ),
    "chunk-ext-invalid": Difference(
        "A chunk extension value that is neither token nor quoted-string ('a=b c', a control "
        "byte): llhttp rejects it, h11 does not look at chunk extensions. RFC 9112 §7.1.1: "
        "chunk-ext-val = token / quoted-string, so h11 is the lax one.",
        client_rejects(r"Invalid character in chunk extensions"),
    ),
    "trailer-framing-field": Difference(
        "Content-Length in a chunked body's trailer section: llhttp rejects it as conflicting "
        "framing, h11 accepts (and ignores) it. RFC 9110 §6.5.1: framing fields cannot be "
        "processed as trailers and a sender MUST NOT send a trailer field the definition does "
        "not permit there; rejecting is the conservative reading.",
        client_rejects(r"Content-Length can't be present with Transfer-Encoding"),
    ),
    "http-version-minor": Difference(
        "'HTTP/1.2': llhttp rejects the version, h11 accepts it. A deviation of llhttp's from "
        "a SHOULD (RFC 9112 §2.3: process a higher minor version as the highest implemented); "
        "no deployed server sends it, and the failure is a 502.",
        client_rejects(r"Invalid HTTP version"),
    ),
    "http10-1xx": Difference(
        "An interim response labelled HTTP/1.0 before the final one: llhttp takes a 1.0 "
        "message without keep-alive as the connection's last and rejects the bytes after it; "
        "h11 skips it. HTTP/1.0 defines no 1xx (RFC 9110 §15.2), so the label is itself "
        "invalid.",
        client_rejects(r"Data after `Connection: close`"),
    ),
    "1xx-flood": Difference(
        "Interim responses totalling more than the head limit: the client counts every byte "
        "before the final head, 1xx heads included, against MAX_HEAD_BYTES plus one read of "
        "slack (upstream_client.data_received); h11 bounds each event alone, so an upstream "
        "could hold it with 1xx forever. A resource limit, not a framing question.",
        client_rejects(r"response head is over"),
    ),
    "leading-crlf": Difference(
        "Empty lines before the status line: llhttp skips them (the robustness rule of RFC "
        "9112 §2.2, there worded for servers), h11 rejects them. An empty line cannot start a "
        "message, so skipping it cannot shift framing.",
        h11_rejects(r"no response line received|illegal status line"),
    ),
    "crlf-after-message": Difference(
        "CRLF after a complete response: llhttp skips it as an empty line before a next "
        "message when it comes in the same read, so the connection is reused; in a later read "
        "it is a byte outside an exchange and the connection is closed. h11 counts any byte "
        "after the message against reuse. Both choices are safe (RFC 9112 §2.2); only the "
        "reuse verdict depends on the split.",
        client_reuses(True),
        reuse_depends_on_split=True,
    ),
    "te-identity": Difference(
        "'identity' among the transfer codings, chunked or nothing after it: the client takes "
        "it as no coding at all (RFC 2616 §3.6; RFC 7230 dropped the token) and frames the body "
        "by what remains (RFC 9112 §6.3 (4)), so the bytes it relays are the content; h11 "
        "supports no coding but chunked.",
        h11_rejects(r"Only Transfer-Encoding: chunked is supported"),
    ),
    "te-coding-no-body": Difference(
        "A transfer coding other than chunked on a response that has no body (HEAD, 204, "
        "304): the client accepts it, as there are no coded bytes to pass on as plain; h11 "
        "validates Transfer-Encoding whatever the status.",
        h11_rejects(r"Only Transfer-Encoding: chunked is supported"),
    ),
    "te-tab": Difference(
        "A tab after a transfer coding ('Transfer-Encoding: chunked<HTAB>'): the client "
        "refuses the response (502 upstream_bad_response), h11 reads it as chunked. RFC 9110 "
        "§5.6.3 allows HTAB as OWS, so h11 is right; but llhttp strips only SP there and frames "
        "such a body to the close, while the client's own framing check "
        "(`_ends_at_eof_by_codings`) would take it as chunked: the two would disagree on where "
        "the body ends, and refusing is the one safe choice. (A tab before the value is "
        "stripped by both, and accepted.)",
        client_rejects_the_head(r"Transfer-Encoding .*which the proxy does not decode"),
    ),
    "status-over-599": Difference(
        "A status code from 600 to 999: the client refuses it (502 upstream_bad_response), "
        "h11 (and llhttp) accept any three digits from 200 up. RFC 9110 §15: codes outside "
        "100-599 are invalid (used 'for internal communication of non-HTTP status', library "
        "errors) and a client SHOULD process such a response as a 5xx; relayed, it would reach "
        "SDKs that classify answers by range. (Below 100 both refuse: no row.)",
        client_rejects_the_head(r"outside 100-599"),
    ),
    "trailer-limit": Difference(
        "A trailer section over MAX_TRAILER_BYTES (64 KiB) but under MAX_HEAD_BYTES: the client "
        "rejects it (issue 10 item 10: trailers are bounded on their own), h11 has one limit "
        "for every incomplete event, here set to MAX_HEAD_BYTES.",
        client_rejects(r"trailers are over"),
    ),
    "http10-keepalive": Difference(
        "An HTTP/1.0 response with 'Connection: keep-alive': the client (llhttp) keeps the "
        "connection, h11 never keeps an HTTP/1.0 connection (a documented h11 limitation). "
        "RFC 9112 §9.3 lets the recipient of such a response honour keep-alive.",
        client_reuses(True),
    ),
    "http2-status-line": Difference(
        "'HTTP/2.0' in an HTTP/1 status line: both accept the response; h11 keeps the "
        "connection (any version from 1.1 up), llhttp keeps only HTTP/1.1 (or 1.0 with "
        "keep-alive). Not reusing a connection whose upstream claims another protocol is the "
        "conservative choice.",
        client_reuses(False),
    ),
    "head-no-reuse": Difference(
        "A response to HEAD: the client never reuses the connection, h11 does. httptools "
        "cannot tell llhttp that a HEAD response has no body (llhttp's skip-body return of "
        "on_headers_complete is not exposed), so after 'Content-Length: N' llhttp would take "
        "the next response's first N bytes as this body; `finish` therefore closes.",
        client_reuses(False),
    ),
}


# -- the cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    method: str = "GET"
    eof: bool = True
    tags: frozenset[str] = frozenset()


def cut_sets_for(data: bytes) -> list[list[int]]:
    """Short inputs: no cut, every single cut, a cut at every byte. Long: several read sizes."""
    n = len(data)
    if n <= SHORT:
        return [[], *([i] for i in range(1, n)), list(range(1, n))]
    return [list(range(size, n, size)) for size in (READ, READ - 15, 4096, 1000)]


def reconciled(case: Case, client: Outcome, other: Outcome) -> tuple[Outcome, Outcome]:
    for tag in sorted(case.tags):
        client, other = KNOWN_DIFFERENCES[tag].reconcile(client, other)
    return client, other


def check(case: Case, extra_cut_sets: Sequence[Sequence[int]] = ()) -> None:
    """The client is split-invariant, and agrees with h11 up to the case's known differences."""
    cut_sets = [*cut_sets_for(case.data), *extra_cut_sets]
    outcomes = client_outcomes(case.data, cut_sets, case.method, case.eof)
    first = outcomes[0]
    loose = any(KNOWN_DIFFERENCES[tag].reuse_depends_on_split for tag in case.tags)
    for cuts, outcome in zip(cut_sets, outcomes, strict=True):
        if loose:
            outcome = replace(outcome, reusable=first.reusable)
        assert outcome == first, (
            f"split-dependent: cuts {_shown(cuts)} give {outcome}, the first cut set gives {first}"
        )
    other = h11_outcome(case.data, case.method, case.eof)
    client, expected = reconciled(case, first, other)
    if loose:
        client = replace(client, reusable=expected.reusable)
    assert client == expected, (
        f"llmproxy: {first}\nh11:      {other}\ntags: {sorted(case.tags)} (no known difference "
        f"explains this; data {case.data[:300]!r})"
    )


def _shown(cuts: Sequence[int]) -> str:
    return str(list(cuts)) if len(cuts) < 12 else f"[{cuts[0]}, {cuts[1]}, ... {len(cuts)} cuts]"


OK_HEAD = b"HTTP/1.1 200 OK\r\n"
CL2 = b"Content-Length: 2\r\n"
TE = b"Transfer-Encoding: chunked\r\n"
OK2 = OK_HEAD + CL2 + b"\r\nok"
CHUNKED_OK = OK_HEAD + TE + b"\r\n2\r\nok\r\n0\r\n\r\n"
CHUNKED_TWICE = b"c\r\n2\r\nok\r\n0\r\n\r\n\r\n0\r\n\r\n"  # "ok", chunked twice
GZIPPED = gzip.compress(b'{"object": "list", "data": []}', mtime=0)
BIG = upstream_client.MAX_HEAD_BYTES


def _chunked(*lines: bytes) -> bytes:
    return OK_HEAD + TE + b"\r\n" + b"".join(lines)


def shape(
    name: str,
    data: bytes,
    *tags: str,
    method: str = "GET",
    eof: bool = True,
    defect: str | None = None,
) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=defect)] if defect else []
    case = Case(name, data, method, eof, frozenset(tags))
    return pytest.param(case, id=name, marks=marks)


SHAPES = [
    # Content-Length
    shape("cl", OK2),
    shape("cl-zero", OK_HEAD + b"Content-Length: 0\r\n\r\n"),
    shape("cl-leading-zeros", OK_HEAD + b"Content-Length: 002\r\n\r\nok"),
    shape("cl-no-ows", OK_HEAD + b"X:a\r\nContent-Length:2\r\n\r\nok"),
    shape("cl-trailing-ows", OK_HEAD + b"Content-Length:  2 \r\n\r\nok", "trailing-ows"),
    shape("cl-truncated-body", OK_HEAD + b"Content-Length: 5\r\n\r\nok"),
    shape("cl-truncated-body-no-eof", OK_HEAD + b"Content-Length: 5\r\n\r\nok", eof=False),
    shape("cl-no-eof", OK2, eof=False),
    shape("cl-conflicting", OK_HEAD + CL2 + b"Content-Length: 3\r\n\r\nok"),
    shape("cl-duplicate", OK_HEAD + CL2 + CL2 + b"\r\nok", "cl-duplicate-same"),
    shape("cl-list", OK_HEAD + b"Content-Length: 2, 2\r\n\r\nok", "cl-duplicate-same"),
    shape("cl-plus", OK_HEAD + b"Content-Length: +2\r\n\r\nok"),
    shape("cl-negative", OK_HEAD + b"Content-Length: -1\r\n\r\nok"),
    shape("cl-empty", OK_HEAD + b"Content-Length: \r\n\r\nok"),
    shape("cl-letters", OK_HEAD + b"Content-Length: abc\r\n\r\nok"),
    shape("cl-overflow", OK_HEAD + b"Content-Length: 99999999999999999999999\r\n\r\nok"),
    shape("cl-extra-bytes", OK2 + b"XYZ"),
    shape("cl-second-response", OK2 + OK2),
    shape("cl-crlf-after", OK2 + b"\r\n", "crlf-after-message"),
    shape("connection-close", OK_HEAD + b"Connection: close\r\n" + CL2 + b"\r\nok"),
    shape(
        "connection-close-mixed-case",
        OK_HEAD + b"Connection: Keep-Alive, Close\r\n" + CL2 + b"\r\nok",
    ),
    # chunked
    shape("chunked", CHUNKED_OK),
    shape("chunked-empty", _chunked(b"0\r\n\r\n")),
    shape("chunked-hex", _chunked(b"A\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n")),
    shape("chunked-leading-zeros", _chunked(b"0002\r\nok\r\n0000\r\n\r\n")),
    shape("chunked-extensions", _chunked(b'2;a=b;c="d e"\r\nok\r\n1;x\r\n!\r\n0;z=1\r\n\r\n')),
    shape("chunked-trailers", _chunked(b"2\r\nok\r\n0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n")),
    shape(
        "chunked-coding-case",
        OK_HEAD + b"Transfer-Encoding: Chunked \r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "trailing-ows",
    ),
    shape("chunked-truncated", _chunked(b"2\r\nok\r\n0\r\n")),
    shape("chunked-no-last-chunk", _chunked(b"2\r\nok\r\n")),
    shape("chunked-no-eof", _chunked(b"2\r\nok\r\n"), eof=False),
    shape("chunked-size-ows", _chunked(b"2 \r\nok\r\n0\r\n\r\n"), "chunk-size-ows"),
    shape("chunked-ext-bws", _chunked(b"2; a\r\nok\r\n0\r\n\r\n"), "chunk-ext-bws"),
    shape("chunked-ext-bws-equals", _chunked(b"2;a =b\r\nok\r\n0\r\n\r\n"), "chunk-ext-bws"),
    shape("chunked-ext-bws-before-semicolon", _chunked(b"2 ;a=b\r\nok\r\n0\r\n\r\n")),
    shape(
        "chunked-ext-space-in-value", _chunked(b"2;a=b c\r\nok\r\n0\r\n\r\n"), "chunk-ext-invalid"
    ),
    shape("chunked-ext-ctl", _chunked(b"2;a=\x01\r\nok\r\n0\r\n\r\n"), "chunk-ext-invalid"),
    shape("chunked-size-negative", _chunked(b"-2\r\nok\r\n0\r\n\r\n")),
    shape("chunked-size-0x", _chunked(b"0x2\r\nok\r\n0\r\n\r\n")),
    shape("chunked-size-empty", _chunked(b"\r\nok\r\n0\r\n\r\n")),
    shape("chunked-size-overflow", _chunked(b"ffffffffffffffffff\r\nok\r\n0\r\n\r\n")),
    shape("chunked-bad-footer", _chunked(b"2\r\nokXX0\r\n\r\n")),
    shape("chunked-bare-lf-after-data", _chunked(b"2\r\nok\n0\r\n\r\n"), "bare-lf"),
    shape("chunked-bare-lf-size", _chunked(b"2\nok\n0\n\n"), "bare-lf"),
    shape("chunked-trailer-no-colon", _chunked(b"2\r\nok\r\n0\r\nbad\r\n\r\n")),
    shape("chunked-trailer-obs-fold", _chunked(b"0\r\nX: a\r\n b\r\n\r\n"), "obs-fold"),
    shape("chunked-trailer-bare-lf", _chunked(b"0\r\nX: a\n\r\n"), "bare-lf"),
    shape(
        "chunked-trailer-content-length",
        _chunked(b"2\r\nok\r\n0\r\nContent-Length: 5\r\n\r\n"),
        "trailer-framing-field",
    ),
    shape("chunked-extra-bytes", CHUNKED_OK + b"XY"),
    shape("http10-chunked", CHUNKED_OK.replace(b"HTTP/1.1", b"HTTP/1.0", 1)),
    # close-delimited
    shape("close-delimited", OK_HEAD + b"\r\nthe body ends at the close"),
    shape("close-delimited-empty", OK_HEAD + b"\r\n"),
    shape("close-delimited-keep-alive", OK_HEAD + b"Connection: keep-alive\r\n\r\nabc"),
    shape("close-delimited-no-eof", OK_HEAD + b"\r\nabc", eof=False),
    shape("http10-close-delimited", b"HTTP/1.0 200 OK\r\n\r\nabc"),
    shape("http10-cl", b"HTTP/1.0 200 OK\r\n" + CL2 + b"\r\nok"),
    shape(
        "http10-keep-alive",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n" + CL2 + b"\r\nok",
        "http10-keepalive",
    ),
    # 1xx
    shape("100-continue", b"HTTP/1.1 100 Continue\r\n\r\n" + OK2),
    shape("103-early-hints", b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" + OK2),
    shape("1xx-several", b"HTTP/1.1 100 Continue\r\n\r\n" * 3 + b"HTTP/1.1 102 P\r\n\r\n" + OK2),
    shape("1xx-199", b"HTTP/1.1 199 Odd\r\n\r\n" + OK2),
    shape("1xx-with-cl", b"HTTP/1.1 100 Continue\r\nContent-Length: 3\r\n\r\n" + OK2),
    shape("1xx-with-chunked", b"HTTP/1.1 100 Continue\r\n" + TE + b"\r\n" + OK2),
    shape("1xx-with-cl-te", b"HTTP/1.1 100 Continue\r\n" + CL2 + TE + b"\r\n" + OK2, "cl-te"),
    shape("1xx-then-eof", b"HTTP/1.1 100 Continue\r\n\r\n"),
    shape("1xx-then-204", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"),
    shape("1xx-obs-fold", b"HTTP/1.1 100 Continue\r\nX: a\r\n b\r\n\r\n" + OK2, "obs-fold"),
    shape("1xx-http10", b"HTTP/1.0 100 Continue\r\n\r\n" + OK2, "http10-1xx"),
    shape("1xx-many", b"HTTP/1.1 100 Continue\r\n\r\n" * 4000 + OK2),
    shape("1xx-flood", b"HTTP/1.1 100 Continue\r\n\r\n" * 30000 + OK2, "1xx-flood"),
    shape("1xx-after-final-response", OK2 + b"HTTP/1.1 100 Continue\r\n\r\n"),
    shape("1xx-after-chunked-response", CHUNKED_OK + b"HTTP/1.1 103 Early Hints\r\n\r\n"),
    shape("1xx-after-final-response-no-eof", OK2 + b"HTTP/1.1 100 Continue\r\n\r\n", eof=False),
    shape("second-response-no-eof", OK2 + OK2, eof=False),
    shape(
        "101-switching",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    ),
    shape("101-then-200", b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + OK2),
    # no body: 204, 304, HEAD
    shape("204", b"HTTP/1.1 204 No Content\r\n\r\n"),
    shape("204-with-cl", b"HTTP/1.1 204 No Content\r\n" + CL2 + b"\r\n"),
    shape("204-with-chunked", b"HTTP/1.1 204 No Content\r\n" + TE + b"\r\n"),
    shape("204-then-bytes", b"HTTP/1.1 204 No Content\r\n\r\nextra"),
    shape("204-invalid-cl", b"HTTP/1.1 204 No Content\r\nContent-Length: abc\r\n\r\n"),
    shape("304", b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n'),
    shape("304-with-cl", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\n\r\n"),
    shape("304-with-chunked", b"HTTP/1.1 304 Not Modified\r\n" + TE + b"\r\n"),
    shape("304-cl-te", b"HTTP/1.1 304 Not Modified\r\n" + CL2 + TE + b"\r\n", "cl-te"),
    shape("head-cl", OK_HEAD + b"Content-Length: 1234\r\n\r\n", "head-no-reuse", method="HEAD"),
    shape("head-chunked", OK_HEAD + TE + b"\r\n", "head-no-reuse", method="HEAD"),
    shape("head-no-framing", OK_HEAD + b"\r\n", "head-no-reuse", method="HEAD"),
    shape("head-then-bytes", OK_HEAD + CL2 + b"\r\nok", "head-no-reuse", method="HEAD"),
    # CL + TE, and transfer codings
    shape("cl-te", OK_HEAD + CL2 + TE + b"\r\n2\r\nok\r\n0\r\n\r\n", "cl-te"),
    shape("te-cl", OK_HEAD + TE + CL2 + b"\r\n2\r\nok\r\n0\r\n\r\n", "cl-te"),
    shape(
        "te-chunked-tab",
        OK_HEAD + b"Transfer-Encoding: chunked\t\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "te-tab",
    ),
    shape(
        "te-chunked-space-tab",
        OK_HEAD + b"Transfer-Encoding: chunked \t\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "te-tab",
    ),
    shape(
        "te-tab-before-chunked",
        OK_HEAD + b"Transfer-Encoding:\tchunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ),
    shape(
        "te-empty-element", OK_HEAD + b"Transfer-Encoding: , chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    ),
    shape(
        "te-trailing-comma", OK_HEAD + b"Transfer-Encoding: chunked,\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    ),
    shape("te-gzip", OK_HEAD + b"Transfer-Encoding: gzip\r\n\r\n" + GZIPPED),
    shape("te-gzip-cl", OK_HEAD + b"Transfer-Encoding: gzip\r\n" + CL2 + b"\r\nok"),
    shape("te-gzip-http10", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + GZIPPED),
    shape(
        "te-gzip-head",
        OK_HEAD + b"Transfer-Encoding: gzip\r\n\r\n",
        "te-coding-no-body",
        "head-no-reuse",
        method="HEAD",
    ),
    shape(
        "te-gzip-204",
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: gzip\r\n\r\n",
        "te-coding-no-body",
    ),
    shape(
        "te-gzip-304",
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: gzip\r\n\r\n",
        "te-coding-no-body",
    ),
    shape("te-identity", OK_HEAD + b"Transfer-Encoding: identity\r\n\r\nabc", "te-identity"),
    shape(
        "te-identity-chunked",
        OK_HEAD + b"Transfer-Encoding: identity, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "te-identity",
    ),
    shape(
        "te-chunked-identity",
        OK_HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ),
    shape(
        "te-chunked-then-identity-field",
        OK_HEAD + TE + b"Transfer-Encoding: identity\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ),
    shape(
        "te-gzip-chunked",
        OK_HEAD
        + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
        + b"%x\r\n" % len(GZIPPED)
        + GZIPPED
        + b"\r\n0\r\n\r\n",
    ),
    shape(
        "te-chunked-twice",
        OK_HEAD + b"Transfer-Encoding: chunked, chunked\r\n\r\n" + CHUNKED_TWICE,
    ),
    shape("te-two-fields", OK_HEAD + TE + TE + b"\r\n" + CHUNKED_TWICE),
    # status lines
    shape("status-no-reason", b"HTTP/1.1 200\r\n" + CL2 + b"\r\nok"),
    shape("status-empty-reason", b"HTTP/1.1 200 \r\n" + CL2 + b"\r\nok"),
    shape("status-reason-obs-text", b"HTTP/1.1 200 \xc3\x9cberall\r\n" + CL2 + b"\r\nok"),
    shape("status-600", b"HTTP/1.1 600 Odd\r\n" + CL2 + b"\r\nok", "status-over-599"),
    shape("status-two-digits", b"HTTP/1.1 20 OK\r\n" + CL2 + b"\r\nok"),
    shape("status-two-spaces", b"HTTP/1.1  200 OK\r\n" + CL2 + b"\r\nok"),
    shape("status-lowercase-name", b"http/1.1 200 OK\r\n" + CL2 + b"\r\nok"),
    shape("status-leading-space", b" " + OK2),
    shape("status-leading-crlf", b"\r\n" + OK2, "leading-crlf"),
    shape("status-http-1-2", b"HTTP/1.2 200 OK\r\n" + CL2 + b"\r\nok", "http-version-minor"),
    shape("status-http-2-0", b"HTTP/2.0 200 OK\r\n" + CL2 + b"\r\nok", "http2-status-line"),
    shape("status-below-100", b"HTTP/1.1 099 Odd\r\n" + CL2 + b"\r\nok"),
    shape("status-000", b"HTTP/1.1 000 Odd\r\n" + CL2 + b"\r\nok"),
    shape("status-599", b"HTTP/1.1 599 Odd\r\n" + CL2 + b"\r\nok"),
    shape("status-999", b"HTTP/1.1 999 Odd\r\n" + CL2 + b"\r\nok", "status-over-599"),
    shape("empty-response", b""),
    shape("garbage-response", b"SSH-2.0-OpenSSH_9.6\r\n"),
    shape("truncated-head", OK_HEAD + b"Content-Length: 2"),
    shape("truncated-head-no-eof", OK_HEAD + b"Content-Length: 2", eof=False),
    # header lines
    shape("obs-fold", OK_HEAD + b"X: a\r\n b\r\n" + CL2 + b"\r\nok", "obs-fold"),
    shape("obs-fold-tab", OK_HEAD + b"X: a\r\n\tb\r\n" + CL2 + b"\r\nok", "obs-fold"),
    shape("continuation-first", OK_HEAD + b" X: a\r\n" + CL2 + b"\r\nok"),
    shape("bare-lf-everywhere", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", "bare-lf"),
    shape("bare-lf-one-line", OK_HEAD + b"Content-Length: 2\nX: y\r\n\r\nok", "bare-lf"),
    shape("bare-cr", OK_HEAD + b"X: a\rb\r\n" + CL2 + b"\r\nok"),
    shape("space-before-colon", OK_HEAD + b"X : a\r\n" + CL2 + b"\r\nok"),
    shape("no-colon", OK_HEAD + b"X\r\n" + CL2 + b"\r\nok"),
    shape("empty-name", OK_HEAD + b": a\r\n" + CL2 + b"\r\nok"),
    shape("bad-token", OK_HEAD + b"X(y: a\r\n" + CL2 + b"\r\nok"),
    shape("obs-text-name", OK_HEAD + b"X\x80: a\r\n" + CL2 + b"\r\nok"),
    shape("nul-in-value", OK_HEAD + b"X: a\x00b\r\n" + CL2 + b"\r\nok"),
    shape("del-in-value", OK_HEAD + b"X: a\x7fb\r\n" + CL2 + b"\r\nok", "ctl-in-value"),
    shape("ctl-in-value", OK_HEAD + b"X: a\x01b\r\n" + CL2 + b"\r\nok", "ctl-in-value"),
    shape("obs-text-value", OK_HEAD + b"X: \x80\xff caf\xc3\xa9\r\n" + CL2 + b"\r\nok"),
    shape("empty-value", OK_HEAD + b"X:\r\nY: \r\n" + CL2 + b"\r\nok"),
    shape("inner-whitespace", OK_HEAD + b"X:  \t a \t b\r\n" + CL2 + b"\r\nok"),
    shape("trailing-whitespace", OK_HEAD + b"X: a \t\r\n" + CL2 + b"\r\nok", "trailing-ows"),
    shape(
        "duplicate-fields", OK_HEAD + b"Set-Cookie: a=1\r\nset-cookie: b=2\r\n" + CL2 + b"\r\nok"
    ),
    shape("upgrade-on-200", OK_HEAD + b"Connection: upgrade\r\nUpgrade: foo\r\n" + CL2 + b"\r\nok"),
    # sizes: the head limit, and trailers (item 10)
    shape("head-large", OK_HEAD + b"X: " + b"a" * (BIG - 60_000) + b"\r\n" + CL2 + b"\r\nok"),
    shape("head-oversize", OK_HEAD + b"X: " + b"a" * (BIG + 200_000) + b"\r\n" + CL2 + b"\r\nok"),
    shape("head-many-fields", OK_HEAD + b"X-Field: value\r\n" * 30_000 + CL2 + b"\r\nok"),
    shape("head-unterminated", OK_HEAD + b"X: " + b"a" * (4 * BIG), eof=False),
    shape("trailers-moderate", _chunked(b"2\r\nok\r\n0\r\nX-T: " + b"t" * 30_000 + b"\r\n\r\n")),
    shape(
        "trailers-over-trailer-limit",
        _chunked(b"2\r\nok\r\n0\r\nX-T: " + b"t" * 200_000 + b"\r\n\r\n"),
        "trailer-limit",
    ),
    shape(
        "trailers-limit-split-dependent",
        _chunked(b"2\r\nok\r\n0\r\nX-T: " + b"t" * 100_000 + b"\r\n\r\n"),
        "trailer-limit",
    ),
    shape("trailer-unterminated", _chunked(b"2\r\nok\r\n0\r\nX-T: " + b"t" * (8 * BIG)), eof=False),
    shape(
        "trailers-oversize",
        _chunked(b"2\r\nok\r\n0\r\n", (b"X-T: " + b"t" * 20_000 + b"\r\n") * 100, b"\r\n"),
    ),
    shape(
        "chunk-extension-oversize", _chunked(b"2;x=" + b"e" * (2 * BIG) + b"\r\nok\r\n0\r\n\r\n")
    ),
]


@pytest.mark.parametrize("case", SHAPES)
def test_shape(case: Case) -> None:
    check(case)


def test_every_known_difference_is_witnessed() -> None:
    """Each row of KNOWN_DIFFERENCES is needed by a shape: the outcomes differ without it."""
    cases: list[Case] = [param.values[0] for param in SHAPES if not param.marks]
    unused = []
    for tag, difference in KNOWN_DIFFERENCES.items():
        witnessed = False
        for case in (c for c in cases if tag in c.tags):
            client = client_outcomes(case.data, cut_sets_for(case.data)[:1], case.method, case.eof)
            other = h11_outcome(case.data, case.method, case.eof)
            if client[0] != other and difference.reconcile(client[0], other) != (client[0], other):
                witnessed = True
                break
        if not witnessed:
            unused.append(tag)
    assert not unused, f"known differences no shape needs any more: {unused}"


# -- generated framings -------------------------------------------------------------------------

TCHAR = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
FRAMING_NAMES = {"content-length", "transfer-encoding", "connection", "upgrade"}
VALUE_BYTES = [*range(0x21, 0x7F), *range(0x80, 0x100)]
NAMES = st.sampled_from(
    ["Server", "Content-Type", "X-Request-Id", "Set-Cookie", "Cache-Control", "openai-model"]
) | st.text(alphabet=TCHAR, min_size=1, max_size=10).filter(
    lambda n: n.lower() not in FRAMING_NAMES
)
OWS = st.sampled_from([b"", b"", b" ", b"\t", b"  \t"])


@st.composite
def values(draw: st.DrawFn) -> bytes:
    words = draw(st.lists(st.binary(min_size=1, max_size=6).map(_visible), max_size=3))
    return draw(st.sampled_from([b" ", b"\t", b" \t "])).join(words)


def _visible(raw: bytes) -> bytes:
    return bytes(VALUE_BYTES[b % len(VALUE_BYTES)] for b in raw)


@st.composite
def framings(draw: st.DrawFn) -> Case:
    """A response: maybe 1xx heads, a status line, fields, a body framed one way, one flaw."""
    tags: set[str] = set()
    method = draw(st.sampled_from(["GET", "GET", "GET", "HEAD"]))
    if method == "HEAD":
        tags.add("head-no-reuse")
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.0"]))
    status = draw(
        st.sampled_from([200, 201, 204, 206, 304, 400, 404, 413, 429, 500, 503])
        | st.integers(200, 599)
    )
    reason = draw(st.sampled_from([b" OK", b" ", b"", b" Some Reason", b" \xc3\x9cber"]))
    fields: list[tuple[bytes, bytes]] = [
        (draw(NAMES).encode(), draw(values())) for _ in range(draw(st.integers(0, 4)))
    ]
    connection = draw(st.sampled_from([None, None, b"close", b"keep-alive", b"Keep-Alive"]))
    if connection is not None:
        fields.insert(draw(st.integers(0, len(fields))), (b"Connection", connection))
        if version == b"1.0" and connection.lower() == b"keep-alive":
            tags.add("http10-keepalive")
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    content = draw(st.binary(max_size=40))
    no_body = method == "HEAD" or status in (204, 304)
    if no_body:
        content = b""
    length_text = b"%d" % len(content)
    if framing == "length":
        length_text = draw(st.sampled_from([b"", b"0", b"00"])) + length_text
        fields.insert(draw(st.integers(0, len(fields))), (b"Content-Length", length_text))
    elif framing == "chunked":
        coding = draw(st.sampled_from([b"chunked", b"Chunked", b"CHUNKED"]))
        fields.insert(draw(st.integers(0, len(fields))), (b"Transfer-Encoding", coding))
    flaw = draw(
        st.sampled_from(
            [None] * 8
            + [
                "obs-fold",
                "bare-lf",
                "cl-te",
                "cl-duplicate-same",
                "cl-conflict",
                "cl-invalid",
                "space-before-colon",
                "del-in-value",
                "ctl-in-value",
                "bare-cr",
                "chunk-size-ows",
                "chunk-ext-bws",
                "chunk-ext-invalid",
                "bad-chunk-footer",
                "leading-crlf",
                "trailing-bytes",
                "truncate",
            ]
        )
    )
    # Field lines, each with optional whitespace around the value.
    lines: list[bytes] = []
    for name, value in fields:
        before, after = draw(OWS), draw(OWS)
        if name == b"Transfer-Encoding" and b"\t" in after:
            tags.add("te-tab")  # refused, whatever else the response holds
        if after and value:
            tags.add("trailing-ows")
        lines.append(name + b":" + before + value + after)
    if flaw == "cl-te" and framing == "chunked":
        lines.insert(draw(st.integers(0, len(lines))), b"Content-Length: %d" % len(content))
        tags.add("cl-te")
    elif flaw in ("cl-duplicate-same", "cl-conflict", "cl-invalid") and framing == "length":
        index = next(i for i, line in enumerate(lines) if line.startswith(b"Content-Length:"))
        if flaw == "cl-duplicate-same":
            tags.add(flaw)
            if draw(st.booleans()):
                lines.insert(index, b"Content-Length: %d" % len(content))
            else:
                lines[index] = b"Content-Length: %d, %d" % (len(content), len(content))
        elif flaw == "cl-conflict":
            lines.insert(index, b"Content-Length: %d" % (len(content) + 1))
        else:
            bad = draw(st.sampled_from([b"+%d", b"-%d", b"%d abc", b"0x%d", b"%d.0", b"", b"x"]))
            lines[index] = b"Content-Length: " + (bad % len(content) if b"%" in bad else bad)
    elif flaw in ("space-before-colon", "del-in-value", "ctl-in-value", "bare-cr") and lines:
        index = draw(st.integers(0, len(lines) - 1))
        name, _, value = lines[index].partition(b":")
        cut = draw(st.integers(0, len(value)))
        if flaw == "space-before-colon":
            lines[index] = name + draw(st.sampled_from([b" ", b"\t"])) + b":" + value
        else:
            if flaw != "bare-cr":
                tags.add("ctl-in-value")
            inserted = {"del-in-value": b"X\x7fY", "ctl-in-value": b"X\x01Y", "bare-cr": b"X\rY"}
            lines[index] = name + b":" + value[:cut] + inserted[flaw] + value[cut:]
    elif flaw == "obs-fold" and lines:
        index = draw(st.integers(0, len(lines) - 1))
        lines.insert(index + 1, draw(st.sampled_from([b" ", b"\t", b"   "])) + b"folded")
        tags.add("obs-fold")
    head_lines = [b"HTTP/" + version + b" %03d" % status + reason, *lines, b""]
    terminators = [b"\r\n"] * len(head_lines)
    if flaw == "bare-lf":
        terminators[draw(st.integers(0, len(terminators) - 1))] = b"\n"
        tags.add("bare-lf")
    head = b"".join(line + end for line, end in zip(head_lines, terminators, strict=True))
    interim = b"".join(
        b"HTTP/1.1 %d Interim\r\n" % draw(st.sampled_from([100, 102, 103]))
        + b"".join(b"Link: <" + draw(values()) + b">\r\n" for _ in range(draw(st.integers(0, 2))))
        + b"\r\n"
        for _ in range(draw(st.integers(0, 2)))
    )
    # The body as it goes on the wire.
    wire = content
    if framing == "chunked" and not no_body:
        pieces: list[bytes] = []
        rest = content
        while rest:
            size = draw(st.integers(1, len(rest)))
            pieces.append(rest[:size])
            rest = rest[size:]
        chunk_lines = []
        for index, piece in enumerate([*pieces, b""]):
            size_text = draw(st.sampled_from([b"%x", b"%X", b"0%x"])) % len(piece)
            extension = draw(st.sampled_from([b"", b"", b";a", b";a=b", b';q="x y"', b";a=1;b"]))
            footer = b"\r\n"
            if index == 0 and flaw == "chunk-size-ows":
                size_text += b" "
                extension = b""
                tags.add(flaw)
            elif index == 0 and flaw == "chunk-ext-bws":
                extension = draw(st.sampled_from([b"; a", b";a =b", b";a= b"]))
                tags.add(flaw)
            elif index == 0 and flaw == "chunk-ext-invalid":
                extension = draw(st.sampled_from([b";a=b c", b";a=\x01", b";a=b\x7f"]))
                tags.add(flaw)
            elif index == 0 and flaw == "bad-chunk-footer" and piece:
                footer = b"XX"
            chunk_lines.append(size_text + extension + b"\r\n" + piece + (footer if piece else b""))
        trailers = b"".join(
            draw(NAMES).encode() + b": " + draw(values()) + b"\r\n"
            for _ in range(draw(st.integers(0, 2)))
        )
        wire = b"".join(chunk_lines) + trailers + b"\r\n"
    data = interim + head + wire
    if flaw == "leading-crlf":
        data = b"\r\n" + data
        tags.add(flaw)
    eof = draw(st.integers(0, 9)) > 0
    if flaw == "trailing-bytes" and (framing != "close" or no_body):
        trailing = draw(st.sampled_from([b"X", b"\x00\x01", b"\r\n", OK2, b"HTTP/1.1 404 Not\r\n"]))
        data += trailing
        if trailing == b"\r\n":
            tags.add("crlf-after-message")
    elif flaw == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    return Case("generated", data, method, eof, frozenset(tags))


@given(case=framings(), data=st.data())
def test_generated_framings(case: Case, data: st.DataObject) -> None:
    assume(len(case.data) <= SHORT)
    n = len(case.data)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=12))) if n > 1 else []
    check(case, [cuts])
