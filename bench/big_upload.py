"""Big uploads (issue 14, item 3): a 512 MiB multipart upload, direct and through llmproxy.

    python bench/big_upload.py                        # 512 MiB, 2 rounds
    python bench/big_upload.py --size-mib 64 --rounds 1

Starts `python -m fake_upstream` and `python -m llmproxy serve` (LLMPROXY_UPSTREAM_URL = the
fake's /v1, LLMPROXY_MAX_BODY_BYTES = 1 GiB, no egress proxy) on free 127.0.0.1 ports, and stops
them at the end. The upload is what the OpenAI SDK sends for `files.create`: a POST to
/v1/files, `multipart/form-data` with a `purpose` field and a `file` part of --size-mib MiB,
with its Content-Length. The file is one random 1 MiB block repeated, streamed from a generator
that yields the same block object each time, so the client never holds more than that block;
random, so that nothing on the way could make it smaller. The fake answers from
`x-fake-script` without parsing the body, and journals its SHA-256 (`body_sha256`), which is
compared with the client's own.

Each round uploads once direct to the fake and once through the proxy, the order alternating
between rounds, so that drift on the machine moves both alike; one upload of the same size to
each, not counted, warms them up first (the fake's first 512 MiB took it twice as long as the
next ones). Time: from the request's start to the end of the answer; the figure is the total
through the proxy over the total direct. Memory: the proxy's VmRSS (from /proc/<pid>/status,
summed over the process and its children) sampled every 20 ms from before the first round to
after the last, its peak against its value before. Every upload has a deadline (--deadline-s):
the body stops being sent and the answer stops being waited for then.

Exit status 1 when the proxy's peak VmRSS is 150 MB or more, the time ratio is above 1.3, a
digest differs, or an upload failed or missed its deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MiB = 1024 * 1024
MB = 1_000_000
PEAK_RSS_BOUND_MB = 150.0
RATIO_BOUND = 1.3
SAMPLE_EVERY_S = 0.02
UPLOADED = {"id": "file-bench", "object": "file", "purpose": "batch"}
SCRIPT = json.dumps({"status": 200, "body": UPLOADED})


class UploadError(Exception):
    """An upload failed or missed its deadline; the message says how."""


# ------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a started server: no LLMPROXY_* or egress proxy settings inherited."""
    proxies = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LLMPROXY_") and k.lower() not in proxies
    }
    return {**env, **extra}


class Processes:
    """The servers this run started; each in its own session, stopped by its own id."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.logdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=child_env(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.running):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                except ProcessLookupError:
                    pass
        self.running.clear()

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until `url` answers over HTTP; RuntimeError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before listening")
        try:
            httpx.get(url, timeout=1.0, trust_env=False)
            return
        except httpx.TransportError:
            time.sleep(0.02)  # polling readiness, with a deadline
    raise RuntimeError(f"{url} not answering after {timeout:.0f} s")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def rss_kib(pids: list[int]) -> int:
    """VmRSS of these processes, in KiB (those gone count nothing)."""
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


class RssSampler(threading.Thread):
    """VmRSS of a process tree every SAMPLE_EVERY_S until stopped: the peak and the count."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pids = process_tree(pid)  # the tree is fixed once serving: one worker, no forks
        self.before_kib = rss_kib(self.pids)
        self.peak_kib = self.before_kib
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_EVERY_S):
            self.peak_kib = max(self.peak_kib, rss_kib(self.pids))
            self.samples += 1

    def stop(self) -> None:
        self._done.set()
        self.join(10)


# ------------------------------------------------------------------------- the upload
@dataclass(frozen=True)
class Multipart:
    """A multipart/form-data body: a `purpose` field, then a `file` part of `size` bytes."""

    block: bytes
    blocks: int
    tail: int  # bytes of the block after the whole blocks
    boundary: str

    @classmethod
    def of_size(cls, size: int) -> Multipart:
        block = os.urandom(MiB)
        while True:
            boundary = secrets.token_hex(24)
            if boundary.encode() not in block + block[:64]:
                return cls(block, size // MiB, size % MiB, boundary)

    @property
    def preamble(self) -> bytes:
        return (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
            f"batch\r\n--{self.boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="batch.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()

    @property
    def epilogue(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    @property
    def length(self) -> int:
        return len(self.preamble) + self.blocks * len(self.block) + self.tail + len(self.epilogue)

    def parts(self, deadline: float | None = None) -> Iterator[bytes]:
        """The body, the same block object over and over; UploadError past `deadline`."""
        yield self.preamble
        for _ in range(self.blocks):
            if deadline is not None and time.monotonic() > deadline:
                raise UploadError("the body was not sent within the deadline")
            yield self.block
        if self.tail:
            yield self.block[: self.tail]
        yield self.epilogue

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for part in self.parts():
            digest.update(part)
        return digest.hexdigest()


@dataclass
class Upload:
    round: int
    target: str
    seconds: float
    digest_matches: bool


def upload(client: httpx.Client, base_url: str, body: Multipart, deadline_s: float) -> float:
    """One upload to `base_url`/files; its duration in seconds."""
    started = time.monotonic()
    try:
        response = client.post(
            f"{base_url}/files",
            content=body.parts(started + deadline_s),
            headers={
                "content-type": body.content_type,
                "content-length": str(body.length),
                "x-fake-script": SCRIPT,
            },
            timeout=httpx.Timeout(deadline_s, connect=10.0),
        )
    except httpx.HTTPError as error:
        raise UploadError(f"{type(error).__name__}: {error}") from None
    seconds = time.monotonic() - started
    if response.status_code != 200:
        raise UploadError(f"answered {response.status_code}: {response.text[:300]}")
    if seconds > deadline_s:
        raise UploadError(f"took {seconds:.1f} s, over the {deadline_s:g} s deadline")
    return seconds


def journaled_digest(client: httpx.Client, fake_url: str) -> str:
    """The SHA-256 of the one body the fake has journaled since it was last cleared."""
    entries = client.get(f"{fake_url}/_fake/journal", timeout=10.0).json()
    if len(entries) != 1:
        raise UploadError(f"the fake journaled {len(entries)} requests, not 1")
    digest: str = entries[0]["body_sha256"]
    return digest


# ------------------------------------------------------------------------- the run
def run(args: argparse.Namespace, processes: Processes) -> int:
    fake_port, proxy_port = free_port(), free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    fake = processes.start(
        "fake_upstream",
        [sys.executable, "-m", "fake_upstream", "--host", "127.0.0.1", "--port", str(fake_port)],
        {},
    )
    proxy = processes.start(
        "llmproxy",
        [sys.executable, "-m", "llmproxy", "serve", "--port", str(proxy_port)],
        {
            "LLMPROXY_UPSTREAM_URL": f"{fake_url}/v1",
            "LLMPROXY_MAX_BODY_BYTES": str(1024 * MiB),
            "LLMPROXY_UPSTREAM_PROXY": "none",
            "LLMPROXY_HOST": "127.0.0.1",
        },
    )
    for name, url, proc in (("fake_upstream", fake_url, fake), ("llmproxy", proxy_url, proxy)):
        try:
            wait_ready(url, proc)
        except RuntimeError as error:
            print(f"{name}: {error}\n{processes.log_tail(name)}", file=sys.stderr)
            return 1
    targets = {"direct": f"{fake_url}/v1", "llmproxy": f"{proxy_url}/v1"}
    body = Multipart.of_size(args.size_mib * MiB)
    expected = body.sha256()
    uploads: list[Upload] = []
    failures: list[str] = []
    with httpx.Client(trust_env=False) as client:
        for target, url in targets.items():
            try:
                upload(client, url, body, args.deadline_s)
            except UploadError as error:
                print(f"warm-up, {target}: {error}", file=sys.stderr)
                return 1
        sampler = RssSampler(proxy.pid)
        sampler.start()
        try:
            for number in range(1, args.rounds + 1):
                order = list(targets) if number % 2 else list(reversed(targets))
                for target in order:
                    client.delete(f"{fake_url}/_fake/journal", timeout=10.0)
                    try:
                        seconds = upload(client, targets[target], body, args.deadline_s)
                        matches = journaled_digest(client, fake_url) == expected
                    except UploadError as error:
                        failures.append(f"round {number}, {target}: {error}")
                        continue
                    uploads.append(Upload(number, target, seconds, matches))
        finally:
            sampler.stop()
    report(args, body, uploads, failures, sampler)
    failed = verdicts(uploads, sampler, args.rounds, not args.report_time_only)
    return 1 if failures or failed else 0


def totals(uploads: list[Upload]) -> dict[str, float]:
    sums: dict[str, float] = {}
    for one in uploads:
        sums[one.target] = sums.get(one.target, 0.0) + one.seconds
    return sums


def verdicts(
    uploads: list[Upload], sampler: RssSampler, rounds: int, time_bound: bool = True
) -> list[str]:
    """What failed its bound (empty: all held); the time ratio only with `time_bound`."""
    failed = []
    peak_mb = sampler.peak_kib * 1024 / MB
    if peak_mb >= PEAK_RSS_BOUND_MB:
        failed.append(f"peak VmRSS {peak_mb:.1f} MB >= {PEAK_RSS_BOUND_MB:g} MB")
    sums = totals(uploads)
    if time_bound and len(uploads) == 2 * rounds:
        ratio = sums["llmproxy"] / sums["direct"]
        if ratio > RATIO_BOUND:
            failed.append(f"time ratio {ratio:.2f} > {RATIO_BOUND:g}")
    if not all(one.digest_matches for one in uploads):
        failed.append("a SHA-256 at the fake differs from the client's")
    return failed


def report(
    args: argparse.Namespace,
    body: Multipart,
    uploads: list[Upload],
    failures: list[str],
    sampler: RssSampler,
) -> None:
    size_mib = body.length / MiB
    print(f"\n### Big upload: {body.length:,} bytes ({size_mib:.1f} MiB) multipart, loopback\n")
    print("| round | target | seconds | MiB/s | SHA-256 at the fake |")
    print("| ---: | --- | ---: | ---: | --- |")
    for one in uploads:
        same = "identical" if one.digest_matches else "DIFFERS"
        speed = size_mib / one.seconds
        print(f"| {one.round} | {one.target} | {one.seconds:.2f} | {speed:.0f} | {same} |")
    sums = totals(uploads)
    ratio = (
        sums["llmproxy"] / sums["direct"]
        if len(uploads) == 2 * args.rounds and sums.get("direct")
        else None
    )
    before_mb = sampler.before_kib * 1024 / MB
    peak_mb = sampler.peak_kib * 1024 / MB
    failed = verdicts(uploads, sampler, args.rounds, not args.report_time_only)
    print("\n| measure | value | bound | |")
    print("| --- | ---: | ---: | --- |")
    print(f"| llmproxy VmRSS before the rounds | {before_mb:.1f} MB | | |")
    peak_ok = "ok" if peak_mb < PEAK_RSS_BOUND_MB else "OVER"
    print(
        f"| llmproxy peak VmRSS ({sampler.samples} samples, every "
        f"{SAMPLE_EVERY_S * 1000:.0f} ms) | {peak_mb:.1f} MB | < {PEAK_RSS_BOUND_MB:g} MB "
        f"| {peak_ok} |"
    )
    print(f"| llmproxy VmRSS growth at peak | {peak_mb - before_mb:.1f} MB | | |")
    if ratio is not None:
        ratio_ok = "ok" if ratio <= RATIO_BOUND else "OVER"
        print(
            f"| time through llmproxy / direct (totals of {args.rounds} rounds) "
            f"| {ratio:.2f}× | ≤ {RATIO_BOUND:g}× | {ratio_ok} |"
        )
    matching = sum(one.digest_matches for one in uploads)
    digest_ok = "ok" if matching == len(uploads) and not failures else "FAILED"
    print(f"| SHA-256 identical at the fake | {matching} of {len(uploads)} | all | {digest_ok} |")
    for failure in failures:
        print(f"\nfailed: {failure}")
    print(f"\n{'FAIL: ' + '; '.join(failed) if failed or failures else 'PASS'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=512, help="the file part (default 512)")
    parser.add_argument("--rounds", type=int, default=2, help="default 2")
    parser.add_argument(
        "--deadline-s", type=float, default=120.0, help="per upload, seconds (default 120)"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the started servers' logs")
    parser.add_argument(
        "--report-time-only",
        action="store_true",
        help="report the time ratio without failing on it (nox -s bench: memory and bytes are "
        "the bounds there, times move with the machine's load)",
    )
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.size_mib > 1000:
        parser.error("--size-mib must be 1 to 1000 (the proxy's max_body_bytes is 1 GiB)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    logdir = Path(tempfile.mkdtemp(prefix="llmproxy-big-upload-"))
    processes = Processes(logdir)
    status = 1
    try:
        status = run(args, processes)
        return status
    finally:
        processes.stop_all()
        if status != 0 or args.keep_logs:
            print(f"logs: {logdir}")
        else:
            shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
