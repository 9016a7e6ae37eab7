"""`fake-upstream` / `python -m fake_upstream`: serve the fake upstream until interrupted.

`fake-upstream [--fixtures PATH [--strict]] [--replay DIR]` serves scripts, fixture rules or
cassettes; `fake-upstream record --upstream URL --cassettes DIR` is the recording pass-through.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from fastapi import FastAPI

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


def _add_listening(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"port to bind (default {DEFAULT_PORT}; 0 picks a free port)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn log level (default warning)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="fake-upstream",
        description="A scripted OpenAI-compatible server for tests (see the README). "
        "`fake-upstream record --help`: the recording pass-through.",
    )
    _add_listening(parser)
    parser.add_argument(
        "--latency",
        type=_seconds,
        default=0.0,
        help="seconds added before every /v1 response's headers (default 0)",
    )
    parser.add_argument(
        "--fixtures",
        metavar="PATH",
        help="a JSON file of fixture rules, or a directory of them (see the README)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="answer a request no script or rule covers with 400 no_fixture_matched",
    )
    parser.add_argument(
        "--replay",
        metavar="DIR",
        help="serve every /v1 request from the cassettes in DIR (404 no_cassette if none match)",
    )
    parser.add_argument(
        "--replay-timing",
        choices=["recorded", "none"],
        help="replay at the recorded pace (default) or at once",
    )
    return parser


def build_record_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="fake-upstream record",
        description="Pass every /v1 request through to a real upstream and write one cassette "
        "(JSON) per exchange, secrets redacted.",
    )
    parser.add_argument(
        "--upstream", required=True, metavar="URL", help="e.g. https://api.openai.com"
    )
    parser.add_argument(
        "--cassettes", required=True, metavar="DIR", help="where to write (created if absent)"
    )
    _add_listening(parser)
    return parser


def _configured_app(args: argparse.Namespace, parser: argparse.ArgumentParser) -> FastAPI:
    """The app the arguments ask for; bad files or combinations exit 2 with one line."""
    from fake_upstream.app import create_app, fixtures_of, set_cassette_deck
    from fake_upstream.cassettes import CassetteError
    from fake_upstream.fixtures import FixtureError
    from fake_upstream.playback import make_deck

    if args.record:
        app = create_app()
        try:
            set_cassette_deck(app, make_deck(args.cassettes, "record", upstream=args.upstream))
        except ValueError as exc:  # CassetteError is one
            parser.exit(2, f"{parser.prog}: error: {exc}\n")
        return app
    if args.replay is not None and args.fixtures is not None:
        parser.error("--replay and --fixtures cannot be combined: cassettes answer every request")
    if args.replay_timing is not None and args.replay is None:
        parser.error("--replay-timing needs --replay DIR")
    app = create_app(args.latency)
    try:
        if args.fixtures is not None:
            fixtures_of(app).load(args.fixtures)
        if args.replay is not None:
            set_cassette_deck(app, make_deck(args.replay, timing=args.replay_timing or "recorded"))
    except (FixtureError, CassetteError) as exc:
        # The message names the file (and the rule): nothing in --help would help.
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    fixtures_of(app).strict = args.strict
    return app


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    record = arguments[:1] == ["record"]
    parser = build_record_parser() if record else build_parser()
    args = parser.parse_args(arguments[1:] if record else arguments)
    args.record = record
    # Imported after parsing so `--help` and argument errors stay instant.
    from fake_upstream.server import bind_socket, serve_forever, url_of

    app = _configured_app(args, parser)

    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"fake-upstream: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    url = url_of(sock)

    def announce() -> None:
        doing = f"; recording {args.upstream} into {args.cassettes}" if args.record else ""
        print(f"fake-upstream listening on {url} (OpenAI base URL {url}/v1){doing}", flush=True)

    try:
        serve_forever(app, sock, announce, args.log_level)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT it handled; stopping was the point
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
