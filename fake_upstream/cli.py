"""`fake-upstream` / `python -m fake_upstream`: serve the fake upstream until interrupted."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

DEFAULT_PORT = 8090


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the caller is often a script reading stderr.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: not an integer") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: must be 0-65535")
    return port


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid latency {text!r}: not a number") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"invalid latency {text!r}: must be >= 0 seconds")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="fake-upstream",
        description="A scripted OpenAI-compatible server for tests (see the README).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"port to bind (default {DEFAULT_PORT}; 0 picks a free port)",
    )
    parser.add_argument(
        "--latency",
        type=_seconds,
        default=0.0,
        help="seconds added before every /v1 response's headers (default 0)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn log level (default warning)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing so `--help` and argument errors stay instant.
    from fake_upstream.app import create_app
    from fake_upstream.server import bind_socket, serve_forever, url_of

    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"fake-upstream: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    url = url_of(sock)

    def announce() -> None:
        print(f"fake-upstream listening on {url} (OpenAI base URL {url}/v1)", flush=True)

    try:
        serve_forever(create_app(args.latency), sock, announce, args.log_level)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT it handled; stopping was the point
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
