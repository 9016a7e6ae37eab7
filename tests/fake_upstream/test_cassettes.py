"""Record and replay: the cassette format and its matching (pure), redaction, and round trips
through a recorder whose upstream is a second fake, by the CLI and by the pytest handle."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fake_upstream import FakeUpstreamServer
from fake_upstream.cassettes import (
    REDACTED,
    SECRET_HEADERS,
    Cassette,
    CassetteError,
    CassetteLibrary,
    Chunk,
    cassette_from_json,
    cassette_text,
    cassette_to_json,
    load_library,
    redact_headers,
    replay_plan,
    request_key,
    write_cassette,
)
from fake_upstream.plan import Pause, Write
from tests.fake_upstream.cli_process import run_fake_upstream, running_fake_upstream
from tests.support import free_port

API_KEY = "sk-proj-cassette-secret-4242"
SECRETS = {
    "authorization": f"Bearer {API_KEY}",
    "api-key": "azure-secret-1",
    "x-api-key": "gateway-secret-2",
    "openai-organization": "org-secret-3",
    "openai-project": "proj_secret-4",
    "cookie": "session=cookie-secret-5",
    "proxy-authorization": "Basic proxy-secret-6",
}
SET_COOKIE = "__cf_bm=set-cookie-secret-7; path=/; HttpOnly"
CHUNKS = ["Ein ", "Fluss ", "fließt", " 🌊", "!"]


# --- pure: redaction, matching, the format ---------------------------------------------------

header_names = st.one_of(
    st.sampled_from(sorted(SECRET_HEADERS)).flatmap(
        lambda name: st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
            lambda upper: "".join(c.upper() if u else c for c, u in zip(name, upper, strict=True))
        )
    ),
    st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True),
)
header_lists = st.lists(st.tuples(header_names, st.text(max_size=20)), max_size=12)


@given(headers=header_lists)
def test_redaction_replaces_exactly_the_secret_values(headers: list[tuple[str, str]]) -> None:
    redacted = redact_headers(headers)
    assert [name for name, _ in redacted] == [name for name, _ in headers]
    for (name, value), (_, kept) in zip(headers, redacted, strict=True):
        assert kept == (REDACTED if name.lower() in SECRET_HEADERS else value)


def test_secrets_never_reach_the_file(tmp_path: Path) -> None:
    cassette = Cassette(
        method="POST",
        path="/v1/chat/completions",
        query="",
        request_headers=tuple((name.title(), value) for name, value in SECRETS.items()),
        request_body=b"{}",
        status=200,
        response_headers=(("set-cookie", SET_COOKIE), ("Set-Cookie", SET_COOKIE)),
        headers_ms=1.0,
        chunks=(),
        upstream="https://user:upstream-password-8@api.example.com:8443",
    )
    path = write_cassette(tmp_path, cassette)
    text = path.read_text()
    for secret in [*SECRETS.values(), SET_COOKIE, "upstream-password-8", "user"]:
        assert secret not in text
    assert json.loads(text)["upstream"] == "https://api.example.com:8443"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


@given(
    value=st.dictionaries(st.text(max_size=6), json_values, max_size=6),
    indent=st.sampled_from([None, 2]),
)
def test_json_bodies_match_whatever_their_key_order_and_spacing(
    value: dict[str, Any], indent: int | None
) -> None:
    recorded = json.dumps(value).encode()
    reordered = json.dumps(dict(reversed(list(value.items()))), indent=indent).encode()
    assert request_key("POST", "/v1/x", "", recorded) == request_key("POST", "/v1/x", "", reordered)
    changed = json.dumps({**value, "\0extra": 1}).encode()
    assert request_key("POST", "/v1/x", "", recorded) != request_key("POST", "/v1/x", "", changed)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (("GET", "/v1/models", "a=1&b=2", b""), ("GET", "/v1/models", "b=2&a=1", b""), True),
        (("GET", "/v1/models", "a=1", b""), ("GET", "/v1/models", "a=2", b""), False),
        (("GET", "/v1/models", "", b""), ("POST", "/v1/models", "", b""), False),
        (("GET", "/v1/models", "", b""), ("GET", "/v1/models/x", "", b""), False),
        (("POST", "/v1/x", "", b'{"n": 1}'), ("POST", "/v1/x", "", b'{"n": "1"}'), False),
        (("POST", "/v1/x", "", b'{"s": true}'), ("POST", "/v1/x", "", b'{"s": 1}'), False),
        (("POST", "/v1/x", "", b"raw  bytes"), ("POST", "/v1/x", "", b"raw bytes"), False),
    ],
)
def test_request_keys(
    a: tuple[str, str, str, bytes], b: tuple[str, str, str, bytes], same: bool
) -> None:
    assert (request_key(*a) == request_key(*b)) is same


chunks = st.lists(
    st.tuples(st.floats(0, 1e6, allow_nan=False), st.binary(max_size=40)), max_size=8
).map(lambda pairs: tuple(Chunk(ms, data) for ms, data in sorted(pairs)))


@given(
    body=st.one_of(st.binary(max_size=40), json_values.map(lambda v: json.dumps(v).encode())),
    chunks=chunks,
    query=st.text(max_size=10),
    headers=st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=4),
)
def test_the_file_format_round_trips_every_byte(
    body: bytes, chunks: tuple[Chunk, ...], query: str, headers: list[tuple[str, str]]
) -> None:
    cassette = Cassette(
        method="POST",
        path="/v1/chat/completions",
        query=query,
        request_headers=(("content-type", "application/json"),),
        request_body=body,
        status=200,
        response_headers=tuple(headers),
        headers_ms=0.5,
        chunks=chunks,
    )
    text = cassette_text(cassette)
    assert json.loads(text) == cassette_to_json(cassette)
    loaded = cassette_from_json(json.loads(text))
    assert loaded.chunks == chunks
    assert loaded.key == cassette.key
    assert (loaded.status, loaded.response_headers) == (200, cassette.response_headers)


def test_replay_plans_the_recorded_pace_or_none() -> None:
    cassette = Cassette(
        method="GET",
        path="/v1/models",
        query="",
        request_headers=(),
        request_body=b"",
        status=200,
        response_headers=(),
        headers_ms=100.0,
        chunks=(Chunk(150.0, b"a"), Chunk(150.0, b"b"), Chunk(400.0, b"c")),
    )
    assert replay_plan(cassette, "recorded") == (
        0.1,
        [Pause(0.05), Write(b"a"), Write(b"b"), Pause(0.25), Write(b"c")],
    )
    assert replay_plan(cassette, "none") == (0.0, [Write(b"a"), Write(b"b"), Write(b"c")])


def minimal(status: int, body: bytes = b"{}") -> Cassette:
    return Cassette("POST", "/v1/x", "", (), body, status, (), 0.0, ())


def test_repeated_requests_replay_in_recorded_order_then_the_last_repeats() -> None:
    library = CassetteLibrary(Path("d"))
    for status in (429, 200):
        library.add(f"{status}.json", minimal(status))
    key = request_key("POST", "/v1/x", "", b"{ }")
    served = [library.find(key) for _ in range(3)]
    assert [found[1].status for found in served if found] == [429, 200, 200]
    assert library.find(request_key("POST", "/v1/x", "", b'{"a": 1}')) is None
    message = library.no_match_message(request_key("POST", "/v1/x", "q=1", b'{"a": 1}'))
    assert message.startswith("""no cassette matches POST /v1/x?q=1 with body '{"a":1}' (key """)
    assert message.endswith("in d (2 cassettes; 2 for POST /v1/x, with another query or body)")


def test_recordings_of_one_request_get_numbered_files(tmp_path: Path) -> None:
    names = [write_cassette(tmp_path, minimal(s)).name for s in (500, 200)]
    assert names[0].endswith("-1.json")
    assert names[1].endswith("-2.json")
    # Name order would put -10 before -2; the library orders by the number.
    for status in range(3, 11):
        write_cassette(tmp_path, minimal(status))
    library = load_library(tmp_path)
    key = request_key("POST", "/v1/x", "", b"{}")
    assert [found[1].status for _ in range(10) if (found := library.find(key))] == [
        500,
        200,
        *range(3, 11),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        ('{"request": {}}', "not a cassette: expected {'fake_upstream_cassette': 1, ...}"),
        (
            '{"fake_upstream_cassette": 1, "request": {"method": "GET"}, "response": {}}',
            "request 'path' is missing or of the wrong type",
        ),
    ],
)
def test_a_bad_cassette_is_named(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "c.json").write_text(content)
    with pytest.raises(CassetteError) as caught:
        load_library(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'c.json'}: {message}")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--replay", "/nonexistent/dir"],
            "fake-upstream: error: /nonexistent/dir: not a directory",
        ),
        (["record", "--cassettes", "d"], "the following arguments are required: --upstream"),
        (
            ["record", "--upstream", "ftp://x", "--cassettes", "d"],
            "fake-upstream record: error: invalid upstream URL 'ftp://x'",
        ),
    ],
)
def test_bad_cassette_arguments_are_one_line(arguments: list[str], message: str) -> None:
    result = run_fake_upstream(*arguments, "--port", "0")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


# --- round trips ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_upstream() -> Iterator[FakeUpstreamServer]:
    """The 'real' upstream the recorder talks to: a second fake."""
    with FakeUpstreamServer() as server:
        yield server


@pytest.fixture
def upstream(real_upstream: FakeUpstreamServer) -> FakeUpstreamServer:
    real_upstream.reset()
    return real_upstream


STREAM_REQUEST = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello"}],
    "stream": True,
}


STREAM_SCRIPT = {"chunks": CHUNKS, "delay_per_chunk": 0.03, "headers": {"set-cookie": SET_COOKIE}}


def raw_chunks(base: str, body: object, headers: dict[str, str]) -> tuple[int, list[bytes]]:
    """The status and the body as the client's HTTP parser delivered it, chunk by chunk."""
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers) as got,
    ):
        return got.status_code, list(got.iter_raw())


def test_record_then_replay_by_the_cli_is_byte_identical_per_chunk(
    tmp_path: Path, upstream: FakeUpstreamServer
) -> None:
    upstream.queue(STREAM_SCRIPT)
    with running_fake_upstream(
        "record", "--upstream", upstream.url, "--cassettes", str(tmp_path)
    ) as recorder:
        status, live = raw_chunks(recorder, STREAM_REQUEST, SECRETS)
        with openai.OpenAI(
            base_url=f"{recorder}/v1",
            api_key=API_KEY,
            organization="org-secret-3",
            project="proj_secret-4",
            max_retries=0,
        ) as client:
            completion = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "non-streamed"}]
            )
    assert status == 200
    (streamed, _) = upstream.journal()
    # The recorder relayed each upstream write as it came, and stored each as one chunk.
    assert [len(chunk) for chunk in live] == [chunk["size"] for chunk in streamed["chunks"]]
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 2
    for file in files:
        text = file.read_text()
        for secret in [API_KEY, *SECRETS.values(), SET_COOKIE]:
            assert secret not in text, (file.name, secret)
    (stored,) = [json.loads(f.read_text()) for f in files if "Say hello" in f.read_text()]
    assert [c["text"].encode() for c in stored["response"]["chunks"]] == live

    for timing in ("none", "recorded"):
        with running_fake_upstream("--replay", str(tmp_path), "--replay-timing", timing) as replay:
            # Another key order and no secrets: the match is on method, path, query and body.
            reordered = dict(reversed(list(STREAM_REQUEST.items())))
            again_status, again = raw_chunks(replay, reordered, {"x-fake-script": "ignored"})
            with openai.OpenAI(base_url=f"{replay}/v1", api_key="sk-other", max_retries=0) as c:
                replayed = c.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "non-streamed"}]
                )
                with pytest.raises(openai.NotFoundError) as caught:
                    c.chat.completions.create(model="gpt-4o", messages=[])
            journal = httpx.get(f"{replay}/_fake/journal", timeout=10).json()
        assert (again_status, again) == (200, live), timing
        assert replayed.choices[0].message.content == completion.choices[0].message.content
        assert replayed.id == completion.id
        assert caught.value.code == "no_cassette"
        assert "POST /v1/chat/completions with body '" in caught.value.message
        assert journal[0]["cassette"] in {f.name for f in files}
        assert journal[2]["cassette"] is None
        if timing == "recorded":
            recorded = [c["ms"] for c in stored["response"]["chunks"]]
            written = [c["written_at"] * 1000 for c in journal[0]["chunks"]]
            for i in range(1, len(written)):
                # Sleeps never end early by more than the clock's grain.
                assert written[i] - written[i - 1] >= recorded[i] - recorded[i - 1] - 5


def test_the_pytest_handle_records_replays_and_once(
    tmp_path: Path, fake_upstream: FakeUpstreamServer, upstream: FakeUpstreamServer
) -> None:
    cassettes = tmp_path / "cassettes"
    assert fake_upstream.use_cassettes(cassettes, "once", upstream=upstream.url) == "record"
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "hi"}
    ]
    with openai.OpenAI(base_url=fake_upstream.base_url, api_key=API_KEY, max_retries=0) as client:
        upstream.queue({"status": 429, "headers": {"retry-after": "0"}}, {"chunks": ["second"]})
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        assert (
            client.chat.completions.create(model="gpt-4o-mini", messages=messages)
            .choices[0]
            .message.content
            == "second"
        )
        recorded = fake_upstream.journal()
        assert all(entry["cassette"] for entry in recorded)
        assert [entry["status"] for entry in recorded] == [429, 200]

        assert fake_upstream.use_cassettes(cassettes, "once") == "replay"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        for _ in range(2):  # the last recording keeps answering
            reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
            assert reply.choices[0].message.content == "second"
    assert len(upstream.journal()) == 2  # replay never reached the upstream
    with pytest.raises(ValueError, match="needs upstream=URL"):
        fake_upstream.use_cassettes(tmp_path / "empty", "record")


def test_an_unreachable_upstream_is_a_502_and_no_cassette(
    tmp_path: Path, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.use_cassettes(tmp_path, "record", upstream=f"http://127.0.0.1:{free_port()}")
    response = httpx.get(f"{fake_upstream.base_url}/models", timeout=10)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"
    assert list(tmp_path.iterdir()) == []


def test_reset_stops_cassettes(tmp_path: Path, fake_upstream: FakeUpstreamServer) -> None:
    fake_upstream.use_cassettes(tmp_path, "replay")
    assert httpx.get(f"{fake_upstream.base_url}/models", timeout=10).status_code == 404
    fake_upstream.reset()
    assert httpx.get(f"{fake_upstream.base_url}/models", timeout=10).status_code == 200


def test_a_responses_stream_replays_to_the_same_events(
    tmp_path: Path, fake_upstream: FakeUpstreamServer, upstream: FakeUpstreamServer
) -> None:
    def events() -> list[tuple[str, int]]:
        with (
            openai.OpenAI(base_url=fake_upstream.base_url, api_key=API_KEY, max_retries=0) as c,
            c.responses.stream(model="gpt-4.1", input="Say hello") as stream,
        ):
            seen = [(event.type, event.sequence_number) for event in stream]
            assert stream.get_final_response().output_text == "".join(CHUNKS)
        return seen

    fake_upstream.use_cassettes(tmp_path, "record", upstream=upstream.url)
    upstream.queue({"chunks": CHUNKS})
    recorded = events()
    fake_upstream.use_cassettes(tmp_path, "replay", timing="none")
    assert events() == recorded
    assert recorded[-1] == ("response.completed", len(recorded) - 1)


def test_a_client_leaving_mid_body_cancels_the_upstream_and_writes_nothing(
    tmp_path: Path, fake_upstream: FakeUpstreamServer, upstream: FakeUpstreamServer
) -> None:
    fake_upstream.use_cassettes(tmp_path, "record", upstream=upstream.url)
    upstream.queue("stall_mid_stream")
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST", f"{fake_upstream.base_url}/chat/completions", json=STREAM_REQUEST
        ) as response,
    ):
        received = response.iter_raw()
        for _ in range(3):  # the role delta and two content chunks, then the stall
            next(received)
    upstream.wait_for_journal(lambda j: j[0]["disconnected"])
    (entry,) = fake_upstream.wait_for_journal(lambda j: j[0]["disconnected"])
    assert entry["cassette"] is None
    assert list(tmp_path.iterdir()) == []


def test_an_upstream_failing_mid_body_breaks_the_response_and_writes_nothing(
    tmp_path: Path, fake_upstream: FakeUpstreamServer, upstream: FakeUpstreamServer
) -> None:
    fake_upstream.use_cassettes(tmp_path, "record", upstream=upstream.url)
    upstream.queue("reset_mid_stream")
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{fake_upstream.base_url}/chat/completions", json=STREAM_REQUEST, timeout=10)
    (entry,) = fake_upstream.journal()
    assert (entry["completed"], entry["cassette"]) == (False, None)
    assert list(tmp_path.iterdir()) == []
