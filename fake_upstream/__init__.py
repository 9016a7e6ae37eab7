"""A scripted, OpenAI-compatible fake upstream for tests. See the README's "fake_upstream".

Attributes load lazily: the pytest plugin imports this package in every pytest run, and that
must not cost a FastAPI import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fake_upstream.app import create_app
    from fake_upstream.cassettes import CassetteError
    from fake_upstream.fixtures import FixtureError
    from fake_upstream.journal import Journal, JournalTimeoutError
    from fake_upstream.scripts import SCENARIOS, Script, ScriptError
    from fake_upstream.server import FakeUpstreamServer

__all__ = [
    "SCENARIOS",
    "CassetteError",
    "FakeUpstreamServer",
    "FixtureError",
    "Journal",
    "JournalTimeoutError",
    "Script",
    "ScriptError",
    "create_app",
]

_HOMES = {
    "create_app": "fake_upstream.app",
    "CassetteError": "fake_upstream.cassettes",
    "FixtureError": "fake_upstream.fixtures",
    "Journal": "fake_upstream.journal",
    "JournalTimeoutError": "fake_upstream.journal",
    "SCENARIOS": "fake_upstream.scripts",
    "Script": "fake_upstream.scripts",
    "ScriptError": "fake_upstream.scripts",
    "FakeUpstreamServer": "fake_upstream.server",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fake_upstream' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(home), name)
