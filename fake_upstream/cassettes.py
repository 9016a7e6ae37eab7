"""Cassettes: one recorded exchange with a real upstream per JSON file, and the library that
finds the one a request asks for.

Format (version 1), one file per exchange:

    {"fake_upstream_cassette": 1, "recorded_at": "...Z", "upstream": "https://api.openai.com",
     "request": {"method", "path", "query", "headers": [[name, value], ...],
                 "body_json" | "body_text" | "body_base64"},
     "response": {"status", "headers": [[name, value], ...], "headers_ms",
                  "chunks": [{"ms", "text" | "base64"}, ...]}}

`ms` is the time since the request went upstream. Secret headers are stored as `<redacted>`.
A request matches a cassette by method, path, query (pairs, any order) and body (JSON compared
canonically, anything else byte for byte). Everything here is pure except the file reads and
writes, which are confined to `load_library` and `write_cassette`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from fake_upstream.plan import Pause, Step, Write

FORMAT_VERSION: Final = 1
REDACTED: Final = "<redacted>"

SECRET_HEADERS: Final = frozenset(
    {
        "authorization",  # RFC 9110 §11.6.2: the API key, `Bearer sk-...`
        "api-key",  # Azure OpenAI's key header
        "x-api-key",  # Anthropic and many gateways
        "openai-organization",  # account identifiers: not secret, but not for a repository
        "openai-project",
        "cookie",  # RFC 6265 §5.4
        "set-cookie",  # RFC 6265 §4.1
        "proxy-authorization",  # RFC 9110 §11.7.2
    }
)

# RFC 9110 §7.6.1 connection-specific fields, and `date`/`server` which uvicorn always writes
# itself: replaying or passing these on would duplicate or contradict the serving connection's.
NOT_REPLAYED: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "date",
        "server",
    }
)

Timing = Literal["recorded", "none"]
TIMINGS: Final[tuple[str, ...]] = ("recorded", "none")
Mode = Literal["replay", "record", "once"]
MODES: Final[tuple[str, ...]] = ("replay", "record", "once")

_SNIPPET: Final = 200


class CassetteError(ValueError):
    """A cassette file or directory that cannot be used; the message names the file."""


def redact_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers with every secret one's value replaced by `<redacted>` (names compared
    case-insensitively; order, names and repeats kept)."""
    return [
        (name, REDACTED if name.lower() in SECRET_HEADERS else value) for name, value in headers
    ]


def replayable_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Response headers a server can send again on its own connection."""
    return [(name, value) for name, value in headers if name.lower() not in NOT_REPLAYED]


def redact_url(url: str) -> str:
    """The URL without any `user:password@`."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# --- matching -------------------------------------------------------------------------------


def canonical_body(body: bytes) -> bytes:
    """JSON bodies as sorted-key compact JSON (so key order and spacing do not matter);
    anything else as it is."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return body
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_query(query: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(parse_qsl(query, keep_blank_values=True)))


@dataclass(frozen=True, slots=True)
class RequestKey:
    """What a request is matched on."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    body: bytes

    def digest(self) -> str:
        hasher = hashlib.sha256()
        for part in (self.method.upper(), self.path, json.dumps(self.query)):
            hasher.update(part.encode())
            hasher.update(b"\0")
        hasher.update(self.body)
        return hasher.hexdigest()

    def describe(self) -> str:
        """The key in words, for the `no_cassette` error."""
        query = "&".join(f"{k}={v}" for k, v in self.query)
        target = f"{self.method} {self.path}" + (f"?{query}" if query else "")
        body = self.body.decode("utf-8", errors="backslashreplace")
        if len(body) > _SNIPPET:
            body = body[:_SNIPPET] + "..."
        return f"{target} with body {body!r} (key {self.digest()[:12]})"


def request_key(method: str, path: str, query: str, body: bytes) -> RequestKey:
    return RequestKey(method.upper(), path, canonical_query(query), canonical_body(body))


# --- the data -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    ms: float
    data: bytes


@dataclass(frozen=True, slots=True)
class Cassette:
    method: str
    path: str
    query: str
    request_headers: tuple[tuple[str, str], ...]
    request_body: bytes
    status: int
    response_headers: tuple[tuple[str, str], ...]
    headers_ms: float
    chunks: tuple[Chunk, ...]
    recorded_at: str = ""
    upstream: str = ""

    @property
    def key(self) -> RequestKey:
        return request_key(self.method, self.path, self.query, self.request_body)

    def body(self) -> bytes:
        return b"".join(chunk.data for chunk in self.chunks)


def _body_fields(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(body).decode("ascii")}
    try:
        return {"body_json": json.loads(text)}
    except json.JSONDecodeError:
        return {"body_text": text}


def _data_fields(data: bytes) -> dict[str, str]:
    # A chunk can end inside a multi-byte character; then only base64 keeps it exact.
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def cassette_to_json(cassette: Cassette) -> dict[str, Any]:
    """The file's content. Headers must already be redacted (`redact_headers`)."""
    return {
        "fake_upstream_cassette": FORMAT_VERSION,
        "recorded_at": cassette.recorded_at,
        "upstream": cassette.upstream,
        "request": {
            "method": cassette.method,
            "path": cassette.path,
            "query": cassette.query,
            "headers": [[n, v] for n, v in cassette.request_headers],
            **_body_fields(cassette.request_body),
        },
        "response": {
            "status": cassette.status,
            "headers": [[n, v] for n, v in cassette.response_headers],
            "headers_ms": cassette.headers_ms,
            "chunks": [{"ms": c.ms, **_data_fields(c.data)} for c in cassette.chunks],
        },
    }


def _need(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CassetteError(f"{where}{key!r} is missing or of the wrong type")
    return value


def _pairs(value: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in value
    ):
        raise CassetteError(f"{where}'headers' must be a list of [name, value] string pairs")
    return tuple((p[0], p[1]) for p in value)


def _decode_body(request: Mapping[str, Any]) -> bytes:
    if "body_json" in request:
        return json.dumps(request["body_json"], ensure_ascii=False).encode()
    if "body_base64" in request:
        return _b64(request["body_base64"], "request 'body_base64'")
    text = request.get("body_text", "")
    if not isinstance(text, str):
        raise CassetteError("request 'body_text' must be a string")
    return text.encode()


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise CassetteError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise CassetteError(f"{what} is not valid base64") from None


def _chunk(obj: object, index: int) -> Chunk:
    where = f"response chunk {index}: "
    if not isinstance(obj, Mapping):
        raise CassetteError(f"{where}must be an object")
    ms = _need(obj, "ms", (int, float), where)
    if "text" in obj:
        text = _need(obj, "text", str, where)
        return Chunk(float(ms), text.encode())
    return Chunk(float(ms), _b64(obj.get("base64"), f"{where}'base64'"))


def cassette_from_json(obj: object) -> Cassette:
    """Validate a decoded cassette file; raise CassetteError naming the first problem."""
    if not isinstance(obj, Mapping) or obj.get("fake_upstream_cassette") != FORMAT_VERSION:
        raise CassetteError(
            f"not a cassette: expected {{'fake_upstream_cassette': {FORMAT_VERSION}, ...}}"
        )
    request = _need(obj, "request", Mapping, "")
    method = _need(request, "method", str, "request ")
    path = _need(request, "path", str, "request ")
    query = request.get("query", "")
    if not isinstance(query, str):
        raise CassetteError("request 'query' must be a string")
    request_headers = _pairs(request.get("headers", []), "request ")
    request_body = _decode_body(request)
    response = _need(obj, "response", Mapping, "")
    status = _need(response, "status", int, "response ")
    response_headers = _pairs(response.get("headers", []), "response ")
    headers_ms = float(_need(response, "headers_ms", (int, float), "response "))
    chunks = _need(response, "chunks", list, "response ")
    return Cassette(
        method=method,
        path=path,
        query=query,
        request_headers=request_headers,
        request_body=request_body,
        status=status,
        response_headers=response_headers,
        headers_ms=headers_ms,
        chunks=tuple(_chunk(c, i) for i, c in enumerate(chunks)),
        recorded_at=str(obj.get("recorded_at", "")),
        upstream=str(obj.get("upstream", "")),
    )


def replay_plan(cassette: Cassette, timing: Timing) -> tuple[float, list[Step]]:
    """Seconds to wait before the headers, and the writes (with the pauses between them at the
    recorded pace, or none) that replay the cassette's body chunk for chunk."""
    if timing == "none":
        return 0.0, [Write(chunk.data) for chunk in cassette.chunks if chunk.data]
    steps: list[Step] = []
    previous = cassette.headers_ms
    for chunk in cassette.chunks:
        gap = (chunk.ms - previous) / 1000
        if gap > 0:
            steps.append(Pause(gap))
        previous = max(previous, chunk.ms)
        if chunk.data:
            steps.append(Write(chunk.data))
    return max(0.0, cassette.headers_ms / 1000), steps


# --- files ----------------------------------------------------------------------------------

_SLUG = re.compile(r"[^a-z0-9]+")
_SUFFIX = re.compile(r"-(\d+)\.json$")


def cassette_stem(key: RequestKey) -> str:
    """`post-v1-chat-completions-3f2a9c1b0d4e`: readable, and the same for the same request."""
    slug = _SLUG.sub("-", f"{key.method} {key.path}".lower()).strip("-")[:80]
    return f"{slug}-{key.digest()[:12]}"


def _ordinal(path: Path) -> int:
    found = _SUFFIX.search(path.name)
    return int(found.group(1)) if found else 0


def load_cassette(path: Path) -> Cassette:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CassetteError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CassetteError(f"{path}: not valid JSON: {exc}") from None
    try:
        return cassette_from_json(obj)
    except CassetteError as exc:
        raise CassetteError(f"{path}: {exc}") from None


def write_cassette(directory: Path, cassette: Cassette) -> Path:
    """Write a new file for the exchange (never overwriting one): `STEM-N.json`, N counting the
    recordings of the same request from 1. Its headers are redacted here, whatever the caller
    passed."""
    safe = dataclasses.replace(
        cassette,
        request_headers=tuple(redact_headers(cassette.request_headers)),
        response_headers=tuple(redact_headers(cassette.response_headers)),
        recorded_at=cassette.recorded_at or now_iso(),
        upstream=redact_url(cassette.upstream),
    )
    data = cassette_text(safe).encode()
    directory.mkdir(parents=True, exist_ok=True)
    stem = cassette_stem(safe.key)
    ordinal = 1 + max((_ordinal(p) for p in directory.glob(f"{stem}-*.json")), default=0)
    while True:
        path = directory / f"{stem}-{ordinal}.json"
        try:
            # "x": another recorder process may have taken this name since the glob.
            with open(path, "xb") as file:
                file.write(data)
        except FileExistsError:
            ordinal += 1
            continue
        return path


_STRING = r'"(?:[^"\\]|\\.)*"'  # JSON strings hold no raw newline, so these cannot overreach
_PAIR = re.compile(rf"\[\n\s*({_STRING}),\n\s*({_STRING})\n\s*\]")
_CHUNK = re.compile(rf'\{{\n\s*"ms": ([-+.eE0-9]+),\n\s*("(?:text|base64)"): ({_STRING})\n\s*\}}')


def cassette_text(cassette: Cassette) -> str:
    """The file's text: indented JSON with each header pair and each chunk on one line."""
    text = json.dumps(cassette_to_json(cassette), indent=2, ensure_ascii=False)
    text = _PAIR.sub(r"[\1, \2]", text)
    return _CHUNK.sub(r'{"ms": \1, \2: \3}', text) + "\n"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class CassetteLibrary:
    """The cassettes of a directory by request key. Several recordings of the same request
    are served in the order recorded; once all are used, the last one keeps answering."""

    directory: Path
    _by_key: dict[str, list[tuple[str, Cassette]]] = field(default_factory=dict)
    _served: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __len__(self) -> int:
        return sum(len(found) for found in self._by_key.values())

    def add(self, name: str, cassette: Cassette) -> None:
        with self._lock:
            self._by_key.setdefault(cassette.key.digest(), []).append((name, cassette))

    def find(self, key: RequestKey) -> tuple[str, Cassette] | None:
        """The next cassette for the request, and its file name; None when none matches."""
        digest = key.digest()
        with self._lock:
            found = self._by_key.get(digest)
            if not found:
                return None
            served = self._served.get(digest, 0)
            self._served[digest] = served + 1
            return found[min(served, len(found) - 1)]

    def no_match_message(self, key: RequestKey) -> str:
        with self._lock:
            near = sum(
                1
                for found in self._by_key.values()
                for _, c in found
                if c.method.upper() == key.method and c.path == key.path
            )
        total = len(self)
        return (
            f"no cassette matches {key.describe()} in {self.directory} ({total} cassettes; "
            f"{near} for {key.method} {key.path}, with another query or body)"
        )


def load_library(directory: str | Path) -> CassetteLibrary:
    """Every `*.json` cassette of a directory; raise CassetteError (one line) on a bad one."""
    path = Path(directory)
    if not path.is_dir():
        raise CassetteError(f"{path}: not a directory")
    library = CassetteLibrary(path)
    files = sorted(path.glob("*.json"), key=lambda p: (_SUFFIX.sub("", p.name), _ordinal(p)))
    for file in files:
        library.add(file.name, load_cassette(file))
    return library


def has_cassettes(directory: str | Path) -> bool:
    path = Path(directory)
    return path.is_dir() and any(path.glob("*.json"))
