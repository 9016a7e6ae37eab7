"""What `llmproxy serve` does to its own process beyond the app: collector tuning, signals."""

from __future__ import annotations

import json
import subprocess
import sys

from llmproxy.cli import GC_YOUNG_THRESHOLD
from llmproxy.protocol import DisconnectSignal


def test_served_app_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    # In a child process: the collector settings are process-wide.
    program = (
        "import gc, json; from llmproxy.cli import create_served_app; create_served_app();"
        "print(json.dumps([gc.get_threshold(), gc.get_freeze_count()]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    (young, _, _), frozen = json.loads(done.stdout)
    assert young == GC_YOUNG_THRESHOLD > 700
    assert frozen > 10_000  # the modules and classes loaded at start-up


def test_disconnect_signal_calls_its_callback_once_and_stays_gone() -> None:
    calls: list[str] = []
    signal = DisconnectSignal()
    assert not signal.gone
    signal.callback = lambda: calls.append("left")
    signal.fire()
    signal.fire()
    assert calls == ["left"]
    assert signal.gone


def test_disconnect_signal_without_a_callback_only_records_the_loss() -> None:
    signal = DisconnectSignal()
    signal.fire()
    assert signal.gone
