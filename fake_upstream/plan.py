"""Response plans: the exact writes, pauses and endings a script asks for, computed up front.

Planning is pure (bytes in, steps out), so the golden test can pin a stream's bytes without a
server; `responses.ScriptedResponse` then plays a plan over a real connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from fake_upstream import sse, wire
from fake_upstream.scripts import Script

SPLIT_PAUSE: Final = 0.05
"""Pause between the two halves of a `split_event`, unless `delay_per_chunk` is longer."""


@dataclass(frozen=True, slots=True)
class Write:
    data: bytes


@dataclass(frozen=True, slots=True)
class Pause:
    seconds: float


@dataclass(frozen=True, slots=True)
class Stall:
    """Send nothing more; hold the connection until the client leaves."""


@dataclass(frozen=True, slots=True)
class Reset:
    """Abort the TCP connection with an RST."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection (FIN) with the body incomplete."""


Step = Write | Pause | Stall | Reset | Close

# Endings that cut the stream after `after_chunks` content events: no finish chunk, no usage,
# no [DONE], because an interrupted upstream stream never sends them.
INTERRUPTING: Final = frozenset({"close", "reset", "stall", "error_event", "malformed_json"})


def plan_stream(
    script: Script,
    *,
    preamble: Sequence[dict[str, Any]],
    content: Sequence[dict[str, Any]],
    tail: Sequence[dict[str, Any]],
) -> list[Step]:
    """Steps for an SSE body: `preamble` (the role delta), one event per content chunk (each
    preceded by `delay_per_chunk`), then `tail` (finish and usage chunks) and `[DONE]`, as
    modified by the script's `ending`."""
    ending = script.ending
    sep = sse.CRLF if ending == "crlf" else sse.LF
    steps: list[Step] = [Write(sse.encode_event(wire.compact_json(e), sep)) for e in preamble]
    interrupted = ending in INTERRUPTING
    if interrupted and script.after_chunks is not None:
        content = content[: script.after_chunks]
    split_done = False
    for event in content:
        if script.delay_per_chunk:
            steps.append(Pause(script.delay_per_chunk))
        if ending == "ping":
            steps.append(Write(sse.encode_comment("ping", sep)))
        data = sse.encode_event(wire.compact_json(event), sep)
        if ending == "split_event" and not split_done:
            steps.extend(_split(data, script))
            split_done = True
        else:
            steps.append(Write(data))
    if ending == "reset":
        steps.append(Reset())
    elif ending == "stall":
        steps.append(Stall())
    elif ending == "error_event":
        error = wire.error_object(500, script.error)
        steps.append(Write(sse.encode_event(wire.compact_json(error), sep)))
    elif ending == "malformed_json":
        steps.append(Write(sse.MALFORMED_EVENT))
        steps.append(Write(sse.encode_event(sse.DONE, sep)))
    elif ending != "close":
        for index, event in enumerate(tail):
            data = sse.encode_event(wire.compact_json(event), sep)
            if ending == "split_event" and not split_done and index == 0:
                steps.extend(_split(data, script))
                split_done = True
            else:
                steps.append(Write(data))
        if ending == "ping":
            steps.append(Write(sse.encode_comment("ping", sep)))
        steps.append(Write(sse.encode_event(sse.DONE, sep)))
    return steps


def _split(data: bytes, script: Script) -> list[Step]:
    cut = len(data) // 2
    return [Write(data[:cut]), Pause(max(script.delay_per_chunk, SPLIT_PAUSE)), Write(data[cut:])]


def plan_body(body: bytes, script: Script) -> list[Step]:
    """Steps for a non-streamed body. `reset`, `stall` and `close` send the first half of the
    body (the response's Content-Length still announces all of it), then act; the SSE-only
    endings do not apply and the body goes out whole."""
    if script.ending in ("reset", "stall", "close"):
        half = body[: len(body) // 2]
        ending: Step = (
            Reset()
            if script.ending == "reset"
            else Stall()
            if script.ending == "stall"
            else Close()
        )
        return [Write(half), ending] if half else [ending]
    return [Write(body)] if body else []


def stream_bytes(steps: Sequence[Step]) -> bytes:
    """Everything a plan writes, concatenated (for golden tests and transcripts)."""
    return b"".join(step.data for step in steps if isinstance(step, Write))
