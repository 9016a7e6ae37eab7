"""The benchmark harness (bench/) imports and formats its tables; no load, no nginx or wrk."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

TIMES = "\N{MULTIPLICATION SIGN}"
BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # bench/ is a folder of scripts importing each other
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run() -> ModuleType:
    return _load("run")


def test_every_piece_imports() -> None:
    for name in ("payloads", "loadgen", "py_upstream", "reference_proxy", "run"):
        _load(name)


def test_fixed_answers() -> None:
    payloads = _load("payloads")
    assert 900 < len(payloads.COMPLETION) < 1200
    assert payloads.STREAM.count(b"data: ") == 50
    assert payloads.STREAM.endswith(b"data: [DONE]\n\n")
    assert len(payloads.SLOW_STREAM_EVENTS) == payloads.SLOW_EVENTS


def _load_row(target: str, number: int, rps: float, p50: float) -> dict[str, object]:
    def run_(rps: float) -> dict[str, float]:
        return {
            "rps": rps,
            "requests": rps * 5,
            "p50_ms": p50,
            "p99_ms": p50 * 3,
            "non2xx": 0,
            "errors": 0,
            "cpu_ms_per_req": 1000 / rps,
            "generator_cpu_pct": 99.0 if target == "direct" else 20.0,
            "target_cpu_pct": 10.0 if target == "direct" else 99.0,
        }

    row: dict[str, object] = {
        "target": target,
        "round": number,
        "plain": run_(rps),
        "stream": run_(rps * 0.9),
        "c1": run_(rps),
        "c8": run_(rps),
        "peak_rss_mb": 50.0,
    }
    if target != "direct":
        row.update(idle_rss_mb=45.0, startup_s=0.6)
    return row


def test_summary_table_and_bar(run: ModuleType) -> None:
    data = {
        "load": [
            _load_row(target, number, rps, p50)
            for number in (0, 1)
            for target, rps, p50 in (
                ("direct", 20000.0, 0.05),
                ("reference", 2000.0, 0.5),
                ("llmproxy", 1800.0, 0.6),
            )
        ],
        "slow": [
            {"target": t, "round": 0, "streams": 1000, "duration_s": d, "failed": 0}
            | {"peak_rss_mb": m}
            for t, d, m in (("direct", 2.0, None), ("reference", 2.4, 70), ("llmproxy", 2.8, 90))
        ],
        "workers": [
            {"workers": w, "round": 0, "rps": r, "generator_cpu_pct": 30.0}
            for w, r in ((1, 2000.0), (2, 3600.0))
        ],
    }
    summary = run.summarize(data)
    assert summary["within_round"]["llmproxy"]["plain_rps_vs_reference"] == pytest.approx(0.9)
    assert summary["within_round"]["llmproxy"]["added_c1_p50_ms"] == pytest.approx(0.55)
    assert summary["slow"]["llmproxy"]["vs_direct"] == pytest.approx(1.4)
    assert summary["workers"]["ratio"] == pytest.approx(1.8)

    table = run.format_table(summary)
    lines = table.splitlines()
    assert lines[0].startswith("|  | direct | reference proxy | llmproxy |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert f"| non-stream req/s, 64 conns | 20,000 | 2,000 | 1,800 | 0.90{TIMES} |" in table
    assert f"2.80 (1.40{TIMES})" in table

    verdicts = {bar.split()[0]: met for bar, _, met in run.bar_rows(summary)}
    assert verdicts["non-stream"] is False  # 0.9 x the reference
    assert verdicts["added"] is False  # +0.55 ms
    assert verdicts["idle"] is True
    assert verdicts["--workers"] is True  # 1.8 x
    assert "**missed**" in run.format_bar(summary)
    assert any("direct plain" in note for note in run.limits(summary))


def test_wrk_output_is_parsed(run: ModuleType) -> None:
    output = """Running 5s test @ http://127.0.0.1:1/v1/chat/completions
  1 threads and 64 connections
  Latency Distribution
     50%  443.00us
     75%    1.20ms
     90%    2.31ms
     99%   12.50ms
  12345 requests in 5.00s, 14.29MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   2469.00
Transfer/sec:      2.86MB
"""
    result = run.parse_wrk(output)
    assert result["requests"] == 12345
    assert result["rps"] == 2469.0
    assert result["p50_ms"] == pytest.approx(0.443)
    assert result["p99_ms"] == pytest.approx(12.5)
    assert result["errors"] == 3
    assert result["non2xx"] == 4


def test_percentile() -> None:
    loadgen = _load("loadgen")
    values = sorted(float(i) for i in range(1, 101))
    assert loadgen.percentile(values, 0.5) == 50.0
    assert loadgen.percentile(values, 0.99) == 99.0
    assert loadgen.percentile([], 0.5) is None


def test_a_saturated_machine_is_named_as_the_limit_of_the_workers_figure(run: ModuleType) -> None:
    cpus = len(run.os.sched_getaffinity(0))
    busy = {"proxy": 75.0 * cpus, "upstream": 10.0 * cpus, "generator": 10.0 * cpus}
    idle = {"proxy": 40.0 * cpus, "upstream": 5.0 * cpus, "generator": 5.0 * cpus}
    notes = run.limits({"targets": {}, "workers": {"cpu_pct_2": busy}})
    assert any("the machine, not the proxy, was the limit" in note for note in notes)
    assert run.limits({"targets": {}, "workers": {"cpu_pct_2": idle}}) == []


def test_the_instructions_script_imports() -> None:
    module = _load("instructions")
    assert callable(module.instructions_per_request)
