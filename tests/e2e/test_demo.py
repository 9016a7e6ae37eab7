"""`llmproxy demo`: the README's first command works and shows what it promises."""

from __future__ import annotations

import subprocess
import sys

from llmproxy.demo import DEMO_KEY


def test_demo_runs_all_three_calls_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmproxy", "demo"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    transcript = result.stdout
    assert "assistant: 'Hello from fake upstream!'" in transcript
    assert transcript.count("  ' from'") == 1  # the streamed call printed token by token
    assert "<- 429, retry-after:" in transcript
    assert "Demo finished." in transcript
    assert DEMO_KEY not in transcript + result.stderr
