"""Instructions per request under callgrind: a cost measure that other work on the machine
cannot move (requests/s and CPU time move ±20 % between runs on a shared machine; this moves
well under 1 %).

  python bench/instructions.py                 # reference and llmproxy, non-stream and stream
  python bench/instructions.py --targets llmproxy --kinds plain --connections 4

Needs valgrind (`apt-get install valgrind`) and, like run.py, nginx and wrk when installed. Each
proxy runs under `valgrind --tool=callgrind` (about 50x slower, so loads are small); after a
warm-up the counters are zeroed (`callgrind_control -z`), the load runs for `--seconds`, and the
counters are dumped: user-space instructions (Ir) over requests served. Kernel work (system
calls) is not counted, so a change that saves system calls shows in run.py, not here.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run as bench


def instructions_per_request(
    rig: bench.Rig, name: str, kind: str, connections: int, seconds: int
) -> tuple[float, int]:
    """(instructions per request, requests measured) for one target and kind of load."""
    port = bench.free_port()
    base = rig.upstream_url()
    out = Path(tempfile.mkdtemp(prefix="callgrind-"))
    argv = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}/callgrind.%p",
        *bench.proxy_argv(name, port),
    ]
    env = {"BENCH_UPSTREAM_URL": base, "LLMPROXY_UPSTREAM_URL": base}
    proc = rig.procs.start(f"callgrind-{name}", argv, [], env)
    try:
        bench.wait_listening(port, proc, timeout=300)
        path = bench.PLAIN_PATH if kind == "plain" else bench.STREAM_PATH
        url = f"http://127.0.0.1:{port}{path}"
        bench.generate(rig.machine, url, connections, 5, None)  # warm-up: imports, pool, caches
        pids = bench.process_tree(proc.pid)
        target = str(pids[-1])
        subprocess.run(["callgrind_control", "-z", target], capture_output=True, check=True)
        load = bench.generate(rig.machine, url, connections, seconds, None)
        subprocess.run(["callgrind_control", "-d", target], capture_output=True, check=True)
        deadline = time.monotonic() + 30
        dumps: list[Path] = []
        while not dumps and time.monotonic() < deadline:
            dumps = sorted(out.glob(f"callgrind.{target}.*"))
            time.sleep(0.2)  # polling for the dump file, with a deadline
        if not dumps:
            raise RuntimeError(f"{name}: callgrind wrote no dump")
        text = dumps[-1].read_text(errors="replace")
        match = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
        if match is None:
            raise RuntimeError(f"{name}: no totals in {dumps[-1]}")
        requests = int(load["requests"])
        return int(match.group(1)) / requests, requests
    finally:
        rig.procs.stop(proc)
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="reference,llmproxy")
    parser.add_argument("--kinds", default="plain,stream")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=10)
    arguments = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed: apt-get install valgrind", file=sys.stderr)
        return 2
    machine = bench.Machine.detect(python_upstream=False, python_loadgen=False)
    settings = bench.Settings(1, arguments.seconds, 1, 0, frozenset(), keep_logs=False)
    logdir = Path(tempfile.mkdtemp(prefix="llmproxy-callgrind-"))
    rig = bench.Rig(machine, settings, logdir)
    results: dict[tuple[str, str], float] = {}
    try:
        for kind in arguments.kinds.split(","):
            for name in arguments.targets.split(","):
                per_request, requests = instructions_per_request(
                    rig, name, kind, arguments.connections, arguments.seconds
                )
                results[name, kind] = per_request
                print(
                    f"{name:10s} {kind:6s} {per_request / 1000:8.1f}k instructions per request"
                    f" ({requests} requests, {arguments.connections} connections)",
                    flush=True,
                )
    finally:
        rig.close()
        shutil.rmtree(logdir, ignore_errors=True)
    for kind in arguments.kinds.split(","):
        if ("reference", kind) in results and ("llmproxy", kind) in results:
            ratio = results["llmproxy", kind] / results["reference", kind]
            print(f"llmproxy / reference, {kind}: {ratio:.2f}x instructions per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
