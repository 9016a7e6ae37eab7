"""Fixtures on disk: rules that pick a request's script by what the request asks for.

A fixture file is a JSON list of rules `{"name", "match", "script", "times"}` (all optional);
the first rule that matches and has uses left answers. Parsing and matching are pure
functions; `FixtureSet` is the one piece of state (the rules and their remaining uses) and is
thread-safe, because tests load rules from their own thread while the server's loop matches.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fake_upstream.scripts import Script, ScriptError, parse_queue_entry, type_name

RULE_KEYS: Final = ("name", "match", "script", "times")
MATCH_KEYS: Final = ("path", "model", "contains", "tool", "headers")
_SNIPPET: Final = 60


class FixtureError(ValueError):
    """A fixture file or rule that cannot be used; the message names the file and the rule."""


class NoFixtureMatchedError(LookupError):
    """`--strict` and no rule matched; the message summarises the request."""


@dataclass(frozen=True, slots=True)
class FixtureMatch:
    """What a rule asks of a request; an absent (None / empty) condition always holds."""

    path: str | None = None
    model: str | None = None
    contains: str | None = None
    tool: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class FixtureRule:
    index: int
    name: str | None
    match: FixtureMatch
    script: Script
    times: int | None
    source: str = ""

    @property
    def label(self) -> str | int:
        """How the journal names the rule: its `name`, else its index among the loaded rules."""
        return self.name if self.name is not None else self.index


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """The parts of a request that rules can match on."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    model: str | None = None
    last_user_message: str | None = None
    tools: tuple[str, ...] = ()


# --- reading a request ---------------------------------------------------------------------


def request_facts(
    method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes
) -> RequestFacts:
    """What rules can see of a request; a body that is not a JSON object gives no model,
    message or tools."""
    lowered = tuple((name.lower(), value) for name, value in headers)
    try:
        request = json.loads(body) if body else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        request = None
    if not isinstance(request, Mapping):
        return RequestFacts(method, path, lowered)
    model = request.get("model")
    return RequestFacts(
        method=method,
        path=path,
        headers=lowered,
        model=model if isinstance(model, str) else None,
        last_user_message=last_user_message(request),
        tools=tool_names(request),
    )


def _content_text(content: object) -> str | None:
    """A message's text: a string, or the `text` of each part (`text`, `input_text`) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts) if texts else None
    return None


def last_user_message(request: Mapping[str, Any]) -> str | None:
    """The text of the last user message: chat `messages`, Responses `input` (a string is
    itself the user message; in a list, items with `role: "user"`), or a completions `prompt`."""
    items: object = request.get("messages")
    if items is None:
        items = request.get("input")
        if isinstance(items, str):
            return items
    if isinstance(items, list):
        for item in reversed(items):
            if isinstance(item, Mapping) and item.get("role") == "user":
                text = _content_text(item.get("content"))
                if text is not None:
                    return text
        return None
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], str):
        return prompt[-1]
    return None


def tool_names(request: Mapping[str, Any]) -> tuple[str, ...]:
    """Names of the tools a request offers: chat `{"type": "function", "function": {"name"}}`,
    Responses `{"type": "function", "name"}` (and other named Responses tools), legacy chat
    `functions`."""
    names: list[str] = []
    for key in ("tools", "functions"):
        offered = request.get(key)
        if not isinstance(offered, list):
            continue
        for tool in offered:
            if not isinstance(tool, Mapping):
                continue
            function = tool.get("function")
            name = function.get("name") if isinstance(function, Mapping) else tool.get("name")
            if isinstance(name, str):
                names.append(name)
    return tuple(names)


# --- matching -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*)", pattern)
    return re.compile("".join(".*" if part == "*" else re.escape(part) for part in parts), re.S)


def glob_matches(pattern: str, text: str) -> bool:
    """`*` stands for any run of characters (including none); every other character is literal."""
    return _glob_regex(pattern).fullmatch(text) is not None


def rule_matches(match: FixtureMatch, facts: RequestFacts) -> bool:
    """Every condition of `match` holds for the request."""
    if match.path is not None and not glob_matches(match.path, facts.path):
        return False
    if match.model is not None and (
        facts.model is None or not glob_matches(match.model, facts.model)
    ):
        return False
    if match.contains is not None and (
        facts.last_user_message is None or match.contains not in facts.last_user_message
    ):
        return False
    if match.tool is not None and match.tool not in facts.tools:
        return False
    for name, pattern in match.headers:
        values = [value for sent, value in facts.headers if sent == name]
        if not any(glob_matches(pattern, value) for value in values):
            return False
    return True


def summarize_request(facts: RequestFacts) -> str:
    """One line a test author can act on: what the request looked like to the rules."""
    message = facts.last_user_message
    if message is not None and len(message) > _SNIPPET:
        message = message[:_SNIPPET] + "..."
    tools = ", ".join(facts.tools) if facts.tools else "none"
    return (
        f"{facts.method} {facts.path}, model {facts.model!r}, "
        f"last user message {message!r}, tools: {tools}"
    )


# --- parsing --------------------------------------------------------------------------------


def _parse_match(obj: object) -> FixtureMatch:
    if not isinstance(obj, Mapping):
        raise FixtureError(f"'match' must be an object, got {type_name(obj)}")
    unknown = sorted(set(obj) - set(MATCH_KEYS))
    if unknown:
        raise FixtureError(
            f"match: unknown key {unknown[0]!r}; known keys: {', '.join(MATCH_KEYS)}"
        )
    values: dict[str, Any] = {}
    for key in ("path", "model", "contains", "tool"):
        if key in obj:
            if not isinstance(obj[key], str):
                raise FixtureError(f"match: {key!r} must be a string, got {type_name(obj[key])}")
            values[key] = obj[key]
    if "headers" in obj:
        headers = obj["headers"]
        if not isinstance(headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise FixtureError('match: \'headers\' must be an object {"name": "value"} of strings')
        values["headers"] = tuple((k.lower(), v) for k, v in headers.items())
    return FixtureMatch(**values)


def parse_rule(obj: object, index: int, source: str = "") -> FixtureRule:
    """One rule; raises FixtureError (without the file and rule prefix) naming the problem."""
    if not isinstance(obj, Mapping):
        raise FixtureError(f"a rule must be an object, got {type_name(obj)}")
    unknown = sorted(set(obj) - set(RULE_KEYS))
    if unknown:
        raise FixtureError(f"unknown key {unknown[0]!r}; known keys: {', '.join(RULE_KEYS)}")
    name = obj.get("name")
    if name is not None and not isinstance(name, str):
        raise FixtureError(f"'name' must be a string, got {type_name(name)}")
    times = obj.get("times")
    if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
        raise FixtureError(f"'times' must be an integer >= 1, got {type_name(times)} {times!r}")
    try:
        script = parse_queue_entry(obj.get("script", {}))
    except ScriptError as exc:
        raise FixtureError(f"script: {exc}") from None
    match = _parse_match(obj.get("match", {}))
    return FixtureRule(index, name, match, script, times, source)


def _rule_label(obj: object, index: int) -> str:
    name = obj.get("name") if isinstance(obj, Mapping) else None
    return f"rule {index} ({name!r})" if isinstance(name, str) else f"rule {index}"


def parse_rules(obj: object, source: str, first_index: int = 0) -> list[FixtureRule]:
    """A fixture file's decoded JSON: a list of rules. Errors read `SOURCE: rule N ('name'): ...`;
    N counts from 0 within the file, the rules' `index` from `first_index`."""
    if not isinstance(obj, list):
        raise FixtureError(
            f"{source}: a fixture file must hold a JSON list of rules, got {type_name(obj)}"
        )
    rules = []
    for position, raw in enumerate(obj):
        try:
            rules.append(parse_rule(raw, first_index + position, source))
        except FixtureError as exc:
            raise FixtureError(f"{source}: {_rule_label(raw, position)}: {exc}") from None
    return rules


def fixture_files(path: Path) -> list[Path]:
    """The files behind `--fixtures PATH`: the file itself, or a directory's `*.json` files in
    name order."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".json" and p.is_file())
        if not files:
            raise FixtureError(f"{path}: the directory holds no *.json fixture files")
        return files
    if not path.exists():
        raise FixtureError(f"{path}: no such file or directory")
    return [path]


def load_rules(path: str | Path, first_index: int = 0) -> list[FixtureRule]:
    """Read and validate a fixture file or directory; raise FixtureError (one line) on the
    first problem."""
    rules: list[FixtureRule] = []
    for file in fixture_files(Path(path)):
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FixtureError(f"{file}: cannot read: {exc}") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FixtureError(f"{file}: not valid JSON: {exc}") from None
        rules.extend(parse_rules(obj, str(file), first_index + len(rules)))
    return rules


# --- state ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Loaded:
    rule: FixtureRule
    uses_left: int | None


@dataclass(slots=True)
class FixtureSet:
    """The rules an app answers with, their remaining uses, and whether it is strict."""

    strict: bool = False
    _rules: list[_Loaded] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self, path: str | Path) -> list[FixtureRule]:
        """Add the rules of a fixture file or directory after those already loaded (all or
        none: a bad file adds nothing)."""
        with self._lock:
            rules = load_rules(path, first_index=len(self._rules))
            self._rules.extend(_Loaded(rule, rule.times) for rule in rules)
            return rules

    def add(self, rules: Sequence[FixtureRule]) -> None:
        with self._lock:
            self._rules.extend(_Loaded(rule, rule.times) for rule in rules)

    def clear(self) -> None:
        """Drop every rule and leave strict mode."""
        with self._lock:
            self._rules.clear()
            self.strict = False

    def choose(
        self, method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> FixtureRule | None:
        """The first matching rule with uses left (and use it once), else None; in strict mode
        raise NoFixtureMatchedError instead of returning None."""
        with self._lock:
            if not self._rules and not self.strict:
                return None
            facts = request_facts(method, path, headers, body)
            for loaded in self._rules:
                if loaded.uses_left == 0 or not rule_matches(loaded.rule.match, facts):
                    continue
                if loaded.uses_left is not None:
                    loaded.uses_left -= 1
                return loaded.rule
            if not self.strict:
                return None
            spent = sum(1 for loaded in self._rules if loaded.uses_left == 0)
            loaded_count = len(self._rules)
        raise NoFixtureMatchedError(
            f"no fixture matched {summarize_request(facts)} "
            f"({loaded_count} rules loaded, {spent} used up)"
        )
