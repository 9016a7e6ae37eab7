"""The fake upstream's FastAPI app: OpenAI-shaped `/v1` endpoints driven by scripts, plus the
`/_fake` control API. All state (journal, script queue, fixture rules, cassette deck, latency)
lives on `app.state`, so two
apps in one process never share anything."""

from __future__ import annotations

import hashlib
import json
import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection
from starlette.routing import WebSocketRoute

from fake_upstream import responses_api, wire
from fake_upstream.fixtures import FixtureSet, NoFixtureMatchedError
from fake_upstream.journal import Journal
from fake_upstream.plan import Step, plan_body, plan_named_stream, plan_stream
from fake_upstream.playback import CassetteDeck, serve_from_deck
from fake_upstream.realtime import WEBSOCKET_PATHS, RealtimeEndpoint
from fake_upstream.response_store import ResponseStore, last_response_object
from fake_upstream.responses import ScriptedResponse
from fake_upstream.script_queue import ScriptQueue
from fake_upstream.scripts import (
    SCENARIOS,
    Script,
    ScriptError,
    parse_queue_request,
    script_from_headers,
)

SCENARIO_HEADER: Final = "x-fake-scenario"
SCRIPT_HEADER: Final = "x-fake-script"

_METHODS: Final = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
_ENDPOINTS: Final[Mapping[tuple[str, str], str]] = {
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/completions"): "completions",
    ("POST", "/v1/embeddings"): "embeddings",
    ("GET", "/v1/models"): "models",
    ("POST", "/v1/responses"): "responses",
}
_RESPONSE_PATH: Final = "/v1/responses/"  # + id: GET retrieves (or replays) a stored response
_UNPARSABLE_BODY: Final = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON.)"
)


def create_app(latency: float = 0.0, *, journal_limit: int | None = 10_000) -> FastAPI:
    """A fresh fake upstream. `latency` seconds are added before every `/v1` response's headers;
    the journal keeps the last `journal_limit` requests (None: all)."""
    if not math.isfinite(latency) or latency < 0:
        raise ValueError(f"latency must be a finite number of seconds >= 0, got {latency!r}")
    app = FastAPI(title="fake_upstream", docs_url=None, redoc_url=None)
    app.state.latency = latency
    app.state.journal = Journal(journal_limit)
    app.state.script_queue = ScriptQueue()
    app.state.fixtures = FixtureSet()
    app.state.cassette_deck = None
    app.state.responses = ResponseStore()
    app.include_router(_control)
    app.add_api_route("/v1/{rest:path}", _serve_v1, methods=_METHODS, include_in_schema=False)
    # WebSocket handshakes (a route matches only its own scope type, so order does not matter).
    endpoint = RealtimeEndpoint()
    app.router.routes.extend(WebSocketRoute(path, endpoint) for path in WEBSOCKET_PATHS)
    return app


def journal_of(app: FastAPI) -> Journal:
    """The Python accessor for an app's journal (same data as `GET /_fake/journal`)."""
    journal: Journal = app.state.journal
    return journal


def script_queue_of(app: FastAPI) -> ScriptQueue:
    queue: ScriptQueue = app.state.script_queue
    return queue


def fixtures_of(app: FastAPI) -> FixtureSet:
    """The fixture rules (`--fixtures`) an app picks scripts with, and its `--strict` flag."""
    fixtures: FixtureSet = app.state.fixtures
    return fixtures


def set_cassette_deck(app: FastAPI, deck: CassetteDeck | None) -> None:
    """Serve every `/v1` request from cassettes (replay or record), or stop (None)."""
    app.state.cassette_deck = deck


def responses_of(app: FastAPI) -> ResponseStore:
    """The responses this app produced on `/v1/responses`, for `GET /v1/responses/{id}`."""
    store: ResponseStore = app.state.responses
    return store


# --- /v1 ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    steps: list[Step]


@dataclass(frozen=True, slots=True)
class Arrival:
    """What the request looked like on the wire, as the echo scenario reports it."""

    method: str
    path: str
    raw_path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    body_sha256: str

    def echo(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "raw_path": self.raw_path,
            "query": self.query,
            "headers": [[name, value] for name, value in self.headers],
            "body_length": len(self.body),
            "body_sha256": self.body_sha256,
        }


async def _serve_v1(request: Request) -> Response:
    journal = journal_of(request.app)
    body = await request.body()
    scope = request.scope
    arrival = Arrival(
        method=request.method,
        path=scope["path"],
        raw_path=(scope.get("raw_path") or scope["path"].encode()).decode("latin-1"),
        query=scope["query_string"].decode("latin-1"),
        # ASGI servers lowercase header names; the order and repeats are as they arrived.
        headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
        body=body,
        body_sha256=hashlib.sha256(body).hexdigest(),
    )
    request_id = wire.new_request_id()
    entry = journal.open(
        id=request_id,
        method=arrival.method,
        path=arrival.path,
        query=arrival.query,
        headers=arrival.headers,
        body_sha256=arrival.body_sha256,
    )
    deck: CassetteDeck | None = request.app.state.cassette_deck
    if deck is not None:
        return await serve_from_deck(deck, arrival, journal, entry)
    try:
        script, fixture = script_for(request, arrival)
    except NoFixtureMatchedError as exc:
        script = Script()
        reply = _json_reply(400, wire.request_error(str(exc), code="no_fixture_matched"), script)
    except ScriptError as exc:
        script = Script()
        reply = _json_reply(400, wire.request_error(str(exc), code="invalid_fake_script"), script)
    else:
        journal.record_script(entry, script.as_json(), fixture)
        reply = build_reply(script, arrival, responses_of(request.app))
    delay = request.app.state.latency + script.delay_before_headers
    base = reply.headers + wire.default_response_headers(request_id, round(delay * 1000))
    return ScriptedResponse(
        status=reply.status,
        headers=wire.merge_headers(base, script.headers),
        steps=reply.steps,
        delay=delay,
        journal=journal,
        entry=entry,
    )


def script_for(request: HTTPConnection, arrival: Arrival) -> tuple[Script, str | int | None]:
    """Header script (scenario and/or inline) if the request carries one, else the next queued
    script, else the first fixture rule that matches (returned with its journal label), else
    the default (or NoFixtureMatchedError when strict). A request with its own script leaves
    the queue and the rules' uses alone. (WebSocket handshakes choose theirs the same way.)"""
    values = {}
    for name in (SCENARIO_HEADER, SCRIPT_HEADER):
        found = request.headers.getlist(name)
        if len(found) > 1:
            raise ScriptError(f"{name}: sent {len(found)} times; send at most one")
        values[name] = found[0] if found else None
    script = script_from_headers(values[SCENARIO_HEADER], values[SCRIPT_HEADER])
    if script is None:
        script = script_queue_of(request.app).pop()
    if script is not None:
        return script, None
    rule = fixtures_of(request.app).choose(
        arrival.method, arrival.path, arrival.headers, arrival.body
    )
    return (rule.script, rule.label) if rule is not None else (Script(), None)


def build_reply(script: Script, arrival: Arrival, store: ResponseStore | None = None) -> Reply:
    """Decide status, headers and body plan for one request. Precedence: echo, a scripted body,
    a scripted error status, then the endpoint's normal OpenAI answer. `store` keeps (and
    answers `GET /v1/responses/{id}` from) the Responses API's answers; None: a throwaway one."""
    store = store if store is not None else ResponseStore()
    if script.echo:
        return _json_reply(script.status or 200, arrival.echo(), script)
    if script.body is not None:
        if isinstance(script.body, str):
            data = script.body.encode()
            content_type = "text/plain; charset=utf-8"
        else:
            data = wire.pretty_json(script.body)
            content_type = "application/json"
        return _bytes_reply(script.status or 200, data, content_type, script)
    if script.status is not None and script.status >= 400:
        return _json_reply(script.status, wire.error_object(script.status, script.error), script)

    endpoint = _ENDPOINTS.get((arrival.method, arrival.path))
    if arrival.method == "GET" and arrival.path.startswith(_RESPONSE_PATH):
        response_id = arrival.path.removeprefix(_RESPONSE_PATH)
        return _stored_response_reply(script, response_id, arrival.query, store)
    if endpoint is None:
        message = f"Invalid URL ({arrival.method} {arrival.path})"
        return _json_reply(404, wire.request_error(message), script)
    if endpoint == "models":
        return _json_reply(script.status or 200, wire.models_list(), script)
    try:
        request = json.loads(arrival.body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        request = None
    if not isinstance(request, dict):
        return _json_reply(400, wire.request_error(_UNPARSABLE_BODY), script)
    if endpoint == "embeddings":
        return _json_reply(script.status or 200, wire.embeddings_list(request), script)
    if endpoint == "responses":
        return _responses_reply(script, request, store)
    return _completion_reply(script, request, chat=endpoint == "chat")


def _reply_chunks(script: Script) -> tuple[str, ...]:
    """The answer's text: the script's chunks, else the default, except that a reply scripted
    as tool calls has no text unless chunks are given too."""
    if script.chunks is not None:
        return script.chunks
    return () if script.tool_calls else wire.DEFAULT_CHUNKS


def _function_calls(script: Script, reply_id: str) -> tuple[wire.FunctionCall, ...]:
    # Call ids not given by the script derive from the reply's id: fixed when it is pinned.
    def call_id(index: int) -> str:
        return "call_" + hashlib.sha256(f"{reply_id}/{index}".encode()).hexdigest()[:24]

    return tuple(
        wire.FunctionCall(call.id or call_id(index), call.name, call.arguments)
        for index, call in enumerate(script.tool_calls)
    )


def _requested_model(script: Script, request: Mapping[str, Any]) -> str:
    requested = request.get("model")
    return script.model or (requested if isinstance(requested, str) else wire.DEFAULT_MODEL)


def _wants_stream(script: Script, request: Mapping[str, Any]) -> bool:
    return script.stream if script.stream is not None else request.get("stream") is True


_SSE_HEADERS: Final = [
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-cache"),
]


def _completion_reply(script: Script, request: dict[str, Any], *, chat: bool) -> Reply:
    if chat:
        chunks = _reply_chunks(script)
    else:
        chunks = script.chunks if script.chunks is not None else wire.DEFAULT_CHUNKS
    reply_id = script.id or wire.new_completion_id("chatcmpl" if chat else "cmpl")
    calls = _function_calls(script, reply_id) if chat else ()
    finish_reason = script.finish_reason or (
        "length" if script.ending == "incomplete" else "tool_calls" if calls else "stop"
    )
    stream_options = request.get("stream_options")
    tokens = wire.output_tokens(chunks, calls)
    fields: dict[str, Any] = {
        "id": reply_id,
        "created": script.created if script.created is not None else wire.now_created(),
        "model": _requested_model(script, request),
        "finish_reason": finish_reason,
        "usage": wire.usage(
            wire.estimate_tokens(wire.prompt_text(request)), tokens, script.reasoning_tokens
        ),
    }
    if chat:
        fields["tool_calls"] = calls
    status = script.status or 200
    if not _wants_stream(script, request):
        if chat:
            content = "".join(chunks) if chunks or not calls else None
            body = wire.chat_completion(content=content, **fields)
        else:
            body = wire.text_completion(text="".join(chunks), **fields)
        return _json_reply(status, body, script)
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    events = wire.chat_chunk_events if chat else wire.text_chunk_events
    head, tail = events(chunks=chunks, include_usage=include_usage, **fields)
    # Chat streams open with a role delta before the content; legacy completions do not.
    lead = 1 if chat else 0
    steps = plan_stream(script, preamble=head[:lead], content=head[lead:], tail=tail)
    return Reply(status, list(_SSE_HEADERS), steps)


def _responses_reply(script: Script, request: dict[str, Any], store: ResponseStore) -> Reply:
    """`POST /v1/responses`: the answer as one `response` object, or as named events."""
    response_id = script.id or responses_api.new_response_id()
    spec = responses_api.ResponseSpec(
        id=response_id,
        created_at=script.created if script.created is not None else wire.now_created(),
        model=_requested_model(script, request),
        chunks=_reply_chunks(script),
        tool_calls=_function_calls(script, response_id),
        input_tokens=wire.estimate_tokens(responses_api.input_text(request)),
        reasoning_tokens=script.reasoning_tokens,
        request=request,
    )
    status = script.status or 200
    if not _wants_stream(script, request):
        body = responses_api.final_response(spec)
        store.put(spec.id, responses_api.stream_events(spec, ending="done", after_chunks=None))
        return _json_reply(status, body, script)
    events = responses_api.stream_events(
        spec,
        ending=script.ending,
        after_chunks=script.after_chunks,
        error=script.error,
        error_shape=script.error_shape,
    )
    store.put(spec.id, events)
    return Reply(status, list(_SSE_HEADERS), plan_named_stream(script, events))


def _stored_response_reply(
    script: Script, response_id: str, query: str, store: ResponseStore
) -> Reply:
    """`GET /v1/responses/{id}`: the stored response, or with `stream=true` its events after
    sequence number `starting_after` (all of them without it)."""
    events = store.events(response_id)
    if events is None:
        message = f"No response found with id '{response_id}'."
        return _json_reply(404, wire.request_error(message, param="response_id"), script)
    params = urllib.parse.parse_qs(query)
    if params.get("stream", ["false"])[-1] != "true":
        return _json_reply(script.status or 200, last_response_object(events), script)
    starting_after = params.get("starting_after", ["-1"])[-1]
    try:
        after = int(starting_after)
    except ValueError:
        message = f"Invalid 'starting_after': expected an integer, got {starting_after!r}."
        return _json_reply(400, wire.request_error(message, param="starting_after"), script)
    remaining = [event for event in events if event["sequence_number"] > after]
    return Reply(script.status or 200, list(_SSE_HEADERS), plan_named_stream(script, remaining))


def _json_reply(status: int, obj: object, script: Script) -> Reply:
    return _bytes_reply(status, wire.pretty_json(obj), "application/json", script)


def _bytes_reply(status: int, data: bytes, content_type: str, script: Script) -> Reply:
    # Content-Length always announces the whole body, so a scripted cut is visibly truncated.
    headers = [("content-type", content_type), ("content-length", str(len(data)))]
    return Reply(status, headers, plan_body(data, script))


# --- /_fake control API ---------------------------------------------------------------------

_control = APIRouter(prefix="/_fake", include_in_schema=False)


@_control.get("/journal")
async def _get_journal(request: Request) -> JSONResponse:
    return JSONResponse(journal_of(request.app).entries())


@_control.delete("/journal", status_code=204)
async def _clear_journal(request: Request) -> Response:
    journal_of(request.app).clear()
    return Response(status_code=204)


@_control.get("/queue")
async def _get_queue(request: Request) -> JSONResponse:
    pending = [script.as_json() for script in script_queue_of(request.app).pending()]
    return JSONResponse({"pending": pending})


@_control.post("/queue")
async def _push_queue(request: Request) -> JSONResponse:
    try:
        scripts = parse_queue_request(json.loads(await request.body()))
    except json.JSONDecodeError as exc:
        message = f"the body is not valid JSON: {exc}"
        return JSONResponse(wire.request_error(message, code="invalid_fake_script"), 400)
    except ScriptError as exc:
        return JSONResponse(wire.request_error(str(exc), code="invalid_fake_script"), 400)
    pending = script_queue_of(request.app).push(scripts)
    return JSONResponse({"queued": len(scripts), "pending": pending})


@_control.delete("/queue", status_code=204)
async def _clear_queue(request: Request) -> Response:
    script_queue_of(request.app).clear()
    return Response(status_code=204)


@_control.get("/scenarios")
async def _get_scenarios() -> JSONResponse:
    return JSONResponse(dict(SCENARIOS))
