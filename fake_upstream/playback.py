"""Serving `/v1` from cassettes: replay a directory of them, or record into one by passing
requests through to a real upstream. While an app has a deck, cassettes answer every `/v1`
request and scripts are not consulted (a recorded request's `x-fake-*` headers were meant for
the upstream)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from starlette.responses import Response

from fake_upstream import wire
from fake_upstream.cassettes import (
    MODES,
    TIMINGS,
    CassetteError,
    CassetteLibrary,
    Mode,
    Timing,
    has_cassettes,
    load_library,
    replay_plan,
    replayable_headers,
    request_key,
)
from fake_upstream.journal import Journal, JournalEntry
from fake_upstream.plan import Write
from fake_upstream.recorder import check_upstream_url, record_exchange
from fake_upstream.responses import ScriptedResponse


@dataclass(frozen=True, slots=True)
class Replaying:
    library: CassetteLibrary
    timing: Timing = "recorded"


@dataclass(frozen=True, slots=True)
class Recording:
    directory: Path
    upstream: str


CassetteDeck = Replaying | Recording


def make_deck(
    directory: str | Path,
    mode: Mode = "replay",
    *,
    upstream: str | None = None,
    timing: Timing = "recorded",
) -> CassetteDeck:
    """The deck for `mode`: `replay` loads the directory; `record` needs `upstream`; `once`
    replays when the directory already holds cassettes and records otherwise (pytest-recording's
    `once`). Raises CassetteError or ValueError with a one-line reason."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {', '.join(TIMINGS)}; got {timing!r}")
    path = Path(directory)
    if mode == "replay" or (mode == "once" and has_cassettes(path)):
        return Replaying(load_library(path), timing)
    if upstream is None:
        raise ValueError(f"mode {mode!r} records {path} and needs upstream=URL")
    if path.exists() and not path.is_dir():
        raise CassetteError(f"{path}: not a directory")
    return Recording(path, check_upstream_url(upstream))


class Inbound(Protocol):
    """The request as it arrived (the app's `Arrival`)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def raw_path(self) -> str: ...
    @property
    def query(self) -> str: ...
    @property
    def headers(self) -> list[tuple[str, str]]: ...
    @property
    def body(self) -> bytes: ...


async def serve_from_deck(
    deck: CassetteDeck, inbound: Inbound, journal: Journal, entry: JournalEntry
) -> Response:
    if isinstance(deck, Recording):
        return await record_exchange(
            directory=deck.directory,
            upstream=deck.upstream,
            method=inbound.method,
            path=inbound.path,
            raw_path=inbound.raw_path,
            query=inbound.query,
            headers=inbound.headers,
            body=inbound.body,
            journal=journal,
            entry=entry,
        )
    key = request_key(inbound.method, inbound.path, inbound.query, inbound.body)
    found = deck.library.find(key)
    if found is None:
        message = deck.library.no_match_message(key)
        data = wire.pretty_json(wire.request_error(message, code="no_cassette"))
        return ScriptedResponse(
            status=404,
            headers=[("content-type", "application/json"), ("content-length", str(len(data)))],
            steps=[Write(data)],
            delay=0.0,
            journal=journal,
            entry=entry,
        )
    name, cassette = found
    journal.record_cassette(entry, name)
    delay, steps = replay_plan(cassette, deck.timing)
    return ScriptedResponse(
        status=cassette.status,
        headers=replayable_headers(cassette.response_headers),
        steps=steps,
        delay=delay,
        journal=journal,
        entry=entry,
    )
