"""The server protocol's parts that need no socket: the joined writes, the uvicorn internals it
relies on, and the descriptor watch (issue 10, items 1, 4 and 14)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import time
from typing import Any

import pytest
import uvicorn
from hypothesis import given
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http import httptools_impl
from uvicorn.server import ServerState

from llmproxy.descriptors import DescriptorWatch, is_exhaustion, should_warn
from llmproxy.protocol import ProxyHttpProtocol, _WritesJoinedPerTurn, serves_lifespan


class RecordingTransport:
    """A socket transport's surface, recording what is written, in order, and the EOF."""

    def __init__(self) -> None:
        self.events: list[bytes | str] = []
        self.closed = False
        self.eof = False

    def write(self, data: bytes) -> None:
        assert not self.eof, "a write after write_eof"
        self.events.append(data)

    def write_eof(self) -> None:
        self.eof = True
        self.events.append("eof")

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def written(self) -> bytes:
        return b"".join(event for event in self.events if isinstance(event, bytes))


# --- item 4: joined writes --------------------------------------------------------------------


async def test_many_writes_in_one_turn_are_joined_once_not_grown_quadratically() -> None:
    transport = RecordingTransport()
    joined = _WritesJoinedPerTurn(transport, asyncio.get_running_loop())
    piece = b"x" * 200
    started = time.perf_counter()
    for _ in range(20_000):  # 4 MB: growing one bytes object by += took ~11 s for this
        joined.write(piece)
    await asyncio.sleep(0)
    elapsed = time.perf_counter() - started
    assert transport.events == [piece * 20_000]
    assert elapsed < 2.0, f"{elapsed:.2f} s for 20,000 joined writes"


async def test_writelines_and_write_eof_go_through_the_same_buffer_in_order() -> None:
    transport = RecordingTransport()
    joined = _WritesJoinedPerTurn(transport, asyncio.get_running_loop())
    joined.write(b"a")
    joined.writelines([b"b", b"c"])
    joined.write_eof()
    joined.write(b"after eof")  # dropped, never written after the EOF
    await asyncio.sleep(0)
    assert transport.events == [b"abc", "eof"]


async def no_answer_app(scope: Scope, receive: Receive, send: Send) -> None:
    await asyncio.Event().wait()  # the test writes in the app's place


def make_protocol(transport: RecordingTransport) -> ProxyHttpProtocol:
    config = uvicorn.Config(no_answer_app, http=ProxyHttpProtocol, lifespan="off")
    protocol = ProxyHttpProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol


async def test_a_refusal_leaves_after_a_response_already_written_in_the_same_turn() -> None:
    # A pipelined request answered in this turn, and the next request refused in the same one:
    # the refusal went straight to the socket, ahead of the answer still in the join buffer,
    # which was then dropped because the socket was closing.
    transport = RecordingTransport()
    protocol = make_protocol(transport)
    protocol.data_received(b"GET /v1/models HTTP/1.1\r\nHost: p\r\n\r\n")
    cycle = protocol.cycle
    assert cycle is not None
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    cycle.transport.write(answer)  # as uvicorn's cycle writes a response
    protocol.data_received(b"\x00 not http\r\n\r\n")
    await asyncio.sleep(0)
    written = transport.written()
    assert written.startswith(answer)
    assert b"HTTP/1.1 400 Bad Request" in written[len(answer) :]
    for task in protocol.tasks:
        task.cancel()


async def test_a_huge_trailer_arriving_in_the_same_read_as_the_body_is_still_refused() -> None:
    # Body bytes reset the count of bytes held by the parser; without slicing a large read,
    # a trailer in the same read as the body's last chunk was never counted at all.
    transport = RecordingTransport()
    protocol = make_protocol(transport)
    protocol.data_received(
        b"POST /v1/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\nX-Trailer: " + b"t" * (100 * 1024)
    )
    await asyncio.sleep(0)
    assert transport.written().startswith(b"HTTP/1.1 431 ")
    for task in protocol.tasks:
        task.cancel()


# --- item 14: the uvicorn internals llmproxy.protocol uses --------------------------------------

PROTOCOL_METHODS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
    "shutdown",
    "handle_websocket_upgrade",
    "_unset_keepalive_if_required",
    "_should_upgrade",
)
PROTOCOL_ATTRIBUTES = (
    "transport",
    "flow",
    "cycle",
    "headers",
    "url",
    "scope",
    "parser",
    "logger",
    "loop",
    "app_state",
    "tasks",
)
CYCLE_ATTRIBUTES = (
    "scope",
    "transport",
    "keep_alive",
    "disconnected",
    "response_started",
    "response_complete",
    "expected_content_length",
    "chunked_encoding",
    "message_event",
    "body",
    "more_body",
)


@pytest.mark.parametrize("name", PROTOCOL_METHODS)
def test_uvicorn_still_has_the_protocol_method_llmproxy_overrides(name: str) -> None:
    assert callable(getattr(httptools_impl.HttpToolsProtocol, name, None)), (
        f"uvicorn {uvicorn.__version__}: HttpToolsProtocol.{name} is gone; llmproxy.protocol "
        "overrides or calls it (README: 'The uvicorn and prometheus-client bounds')"
    )


def test_uvicorn_protocol_constructor_takes_what_llmproxy_passes() -> None:
    parameters = inspect.signature(httptools_impl.HttpToolsProtocol.__init__).parameters
    missing = {"config", "server_state", "app_state", "_loop"} - set(parameters)
    assert not missing, f"uvicorn {uvicorn.__version__}: HttpToolsProtocol() lacks {missing}"


async def test_uvicorn_protocol_and_cycle_still_have_the_attributes_llmproxy_uses() -> None:
    protocol = make_protocol(RecordingTransport())
    protocol.data_received(b"POST /v1/x HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\nab")
    missing = [name for name in PROTOCOL_ATTRIBUTES if not hasattr(protocol, name)]
    assert not missing, f"uvicorn {uvicorn.__version__}: the protocol has no {missing}"
    assert hasattr(protocol.flow, "read_paused"), (
        f"uvicorn {uvicorn.__version__}: FlowControl.read_paused is gone"
    )
    missing = [name for name in CYCLE_ATTRIBUTES if not hasattr(protocol.cycle, name)]
    assert not missing, f"uvicorn {uvicorn.__version__}: RequestResponseCycle has no {missing}"
    assert isinstance(protocol.cycle, httptools_impl.RequestResponseCycle)
    for task in protocol.tasks:
        task.cancel()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"Content-Type", b"application/json"),
        (b"Expect", b"100-Continue"),
        (b"expect", b"nothing"),
        (b"X-\xc3\xa9", b"caf\xe9"),
    ],
)
async def test_the_inlined_on_header_does_what_uvicorns_does(name: bytes, value: bytes) -> None:
    # ProxyHttpProtocol.on_header inlines uvicorn's instead of calling it (one Python call per
    # header fewer): a uvicorn release that changes its on_header must fail here.
    ours = make_protocol(RecordingTransport())
    theirs = make_protocol(RecordingTransport())
    for protocol in (ours, theirs):
        protocol.on_message_begin()
        protocol.expect_100_continue = False
    ours.on_header(name, value)
    httptools_impl.HttpToolsProtocol.on_header(theirs, name, value)
    assert ours.headers == theirs.headers, f"uvicorn {uvicorn.__version__}: on_header changed"
    assert ours.expect_100_continue == theirs.expect_100_continue, (
        f"uvicorn {uvicorn.__version__}: on_header's Expect handling changed"
    )


async def test_the_request_task_is_named_once_tracked_and_dropped_when_done() -> None:
    if not hasattr(httptools_impl.HttpToolsProtocol, "_start_asgi_task"):
        pytest.skip(f"uvicorn {uvicorn.__version__} creates the task inline")
    protocol = make_protocol(RecordingTransport())
    protocol.data_received(b"GET /v1/models HTTP/1.1\r\nHost: p\r\n\r\n")
    assert [task.get_name() for task in protocol.tasks] == ["llmproxy-request"]
    (task,) = protocol.tasks
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)  # done callbacks run on the next turn
    assert not protocol.tasks


# --- item 1: the descriptor watch ---------------------------------------------------------------


@given(  # whole seconds, so the sum below is exact
    last=st.none() | st.integers(0, 10**6).map(float),
    elapsed=st.integers(0, 10**4).map(float),
    interval=st.integers(1, 10**3).map(float),
)
def test_a_warning_is_due_first_and_then_only_once_an_interval_has_passed(
    last: float | None, elapsed: float, interval: float
) -> None:
    now = (last or 0.0) + elapsed
    assert should_warn(last, now, interval) == (last is None or elapsed >= interval)


def test_only_emfile_and_enfile_count_as_exhaustion() -> None:
    assert is_exhaustion(OSError(errno.EMFILE, "Too many open files"))
    assert is_exhaustion(OSError(errno.ENFILE, "Too many open files in system"))
    assert not is_exhaustion(OSError(errno.ECONNRESET, "reset"))
    assert not is_exhaustion(None)


async def test_asyncio_accept_errors_become_one_warning_and_other_errors_pass_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    passed_on: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: passed_on.append(context))
    watch = DescriptorWatch(loop)
    watch.start()
    try:
        with caplog.at_level(logging.WARNING, logger="llmproxy"):
            for _ in range(5):  # what asyncio's selector loop reports per failed accept
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(errno.EMFILE, "Too many open files"),
                    }
                )
            loop.call_exception_handler({"message": "something else"})
    finally:
        watch.stop()
        loop.set_exception_handler(previous)
    warnings = [r for r in caplog.records if "out of file descriptors" in r.getMessage()]
    assert len(warnings) == 1
    assert [context["message"] for context in passed_on] == ["something else"]


@pytest.mark.parametrize(
    ("http", "hardened"),
    [(ProxyHttpProtocol, True), ("httptools", False), ("h11", False)],
)
def test_the_lifespan_tells_which_protocol_uvicorn_serves(http: Any, hardened: bool) -> None:
    """`serves_lifespan` reads uvicorn's `LifespanOn.receive.__self__.config` (an internal)."""
    from uvicorn.lifespan.on import LifespanOn

    lifespan = LifespanOn(uvicorn.Config(app=object(), http=http))
    assert serves_lifespan(lifespan.receive) is hardened


def test_a_lifespan_of_another_server_is_not_served_by_the_protocol() -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    assert serves_lifespan(receive) is False
