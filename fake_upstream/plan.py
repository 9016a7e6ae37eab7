"""Response plans: the exact writes, pauses and endings a script asks for, computed up front.

Planning is pure (bytes in, steps out), so the golden test can pin a stream's bytes without a
server; `responses.ScriptedResponse` then plays a plan over a real connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from fake_upstream import sse, wire
from fake_upstream.responses_api import cut_after, is_delta
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
# no [DONE], because an interrupted upstream stream never sends them. (`failed` has no chat
# form: a chat stream that fails sends the error event.)
INTERRUPTING: Final = frozenset(
    {"close", "reset", "stall", "error_event", "malformed_json", "failed"}
)
# On a Responses stream the events of `error_event`, `failed` and `incomplete` are chosen by
# `responses_api`; these are the endings the plan itself cuts.
TRANSPORT_CUTS: Final = frozenset({"close", "reset", "stall", "malformed_json"})


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
    # `incomplete` on chat: the answer stops after `after_chunks` events, then the finish chunk
    # (finish_reason `length`, chosen by the app) and [DONE] as usual.
    if (interrupted or ending == "incomplete") and script.after_chunks is not None:
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
    elif ending in ("error_event", "failed"):
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


def plan_named_stream(script: Script, events: Sequence[dict[str, Any]]) -> list[Step]:
    """Steps for a Responses stream: each event as `event: <type>` + `data: <json>`, a pause
    (`delay_per_chunk`) before each delta, no `[DONE]`. `close`, `reset`, `stall` and
    `malformed_json` cut after `after_chunks` deltas (default: all of them); `ping` puts a
    comment before each delta and before the last event; `split_event` writes the first delta
    in two halves."""
    ending = script.ending
    sep = sse.CRLF if ending == "crlf" else sse.LF
    if ending in TRANSPORT_CUTS:
        total = sum(1 for event in events if is_delta(event))
        count = total if script.after_chunks is None else script.after_chunks
        events = events[: cut_after(events, count)]
    steps: list[Step] = []
    split_done = False
    for position, event in enumerate(events):
        delta = is_delta(event)
        if delta and script.delay_per_chunk:
            steps.append(Pause(script.delay_per_chunk))
        last = position == len(events) - 1 and ending not in TRANSPORT_CUTS
        if ending == "ping" and (delta or last):
            steps.append(Write(sse.encode_comment("ping", sep)))
        data = sse.encode_event(wire.compact_json(event), sep, event=event["type"])
        if ending == "split_event" and delta and not split_done:
            steps.extend(_split(data, script))
            split_done = True
        else:
            steps.append(Write(data))
    if ending == "reset":
        steps.append(Reset())
    elif ending == "stall":
        steps.append(Stall())
    elif ending == "malformed_json":
        steps.append(Write(sse.encode_event("{not json", sep, event="response.output_text.delta")))
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
