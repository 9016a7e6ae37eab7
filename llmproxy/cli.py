"""`llmproxy serve` and `llmproxy demo` (also `python -m llmproxy ...`)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from llmproxy.config import (
    CONFIG_FILE_ENV,
    SETTINGS,
    Configuration,
    ConfigurationError,
    load_configuration,
)

if TYPE_CHECKING:
    from llmproxy.app import ProxyApp

# prometheus_client's multiprocess directory (the name is the library's).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
EXIT_BAD_SETTING = 2
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (DESIGN §2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_SETTING, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line: `serve` and `demo`."""
    parser = _OneLineParser(prog="llmproxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", metavar="FILE", help="TOML file of settings")
    for setting in SETTINGS:
        if setting.flag is not None:
            # Strings here: the configuration module parses every source the same way, so a
            # bad flag gets the same one-line message as a bad variable.
            serve.add_argument(setting.flag, dest=setting.field, help=f"overrides {setting.env}")
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )

    commands.add_parser("demo", help="run the fake upstream and the proxy, show a few calls")
    return parser


def given_flags(arguments: argparse.Namespace) -> dict[str, str]:
    """The configuration flags given on the command line, keyed by Configuration field."""
    return {
        setting.field: value
        for setting in SETTINGS
        if setting.flag is not None and (value := getattr(arguments, setting.field)) is not None
    }


def export_flags(flags: dict[str, str], config_file: str | None) -> None:
    """Write the given flags into the environment as LLMPROXY_* variables.

    Flags win over the environment, and worker processes (`--workers N`) re-read the
    configuration from their inherited environment, so this is how the flags reach them.
    """
    for setting in SETTINGS:
        if setting.field in flags:
            os.environ[setting.env] = flags[setting.field]
    if config_file is not None:
        os.environ[CONFIG_FILE_ENV] = config_file


def _fail(message: str) -> NoReturn:
    print(f"llmproxy: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_SETTING)


def logging_config(log_level: str) -> dict[str, Any]:
    """uvicorn's logging setup, plus the proxy's own loggers (one line per request at INFO)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["llmproxy"] = {
        "handlers": ["default"],
        "level": log_level.upper(),
        "propagate": False,
    }
    # The per-request lines: plain text to stdout, without uvicorn's coloured level prefix.
    config["formatters"]["llmproxy_access"] = {"format": "%(message)s"}
    config["handlers"]["llmproxy_access"] = {
        "formatter": "llmproxy_access",
        "class": "llmproxy.access_log.BufferedLineHandler",  # written in batches, not per line
        "stream": "ext://sys.stdout",
    }
    config["loggers"]["llmproxy.access"] = {
        "handlers": ["llmproxy_access"],
        "level": log_level.upper(),
        "propagate": False,
    }
    return config


# The cyclic garbage collector's first threshold (CPython's default is 700). Each request keeps
# a few dozen container objects alive while it is in flight, so at 64 concurrent requests the
# default started a young collection every ~14 requests and a full one (45 ms over the whole
# heap) every ~1,700: 12% of the CPU under load, measured with gc.callbacks. Requests free their
# objects by reference counting; with this threshold the same load started none.
GC_YOUNG_THRESHOLD = 10_000


def create_served_app() -> ProxyApp:
    """The app as `llmproxy serve` runs it, in each worker: with the collector tuned for it.

    `gc.freeze()` moves everything alive after start-up (modules, classes, the app) out of the
    collector's reach, so the rare full collections no longer walk it.
    """
    import gc
    import logging

    from llmproxy.app import create_app
    from llmproxy.descriptors import raise_descriptor_limit

    raised = raise_descriptor_limit()  # nginx's worker_rlimit_nofile, per served process
    if raised is not None:
        logging.getLogger("llmproxy").info(
            "file descriptor limit raised from %d to %d (the hard limit)", *raised
        )
    app = create_app()
    # Each log record would otherwise ask the system for the process id and look up the thread
    # and process names; no format llmproxy configures shows them.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)
    return app


def serve(configuration: Configuration, log_level: str) -> None:
    """Run uvicorn with the server options the benchmark chose."""
    import uvicorn  # imported here so `llmproxy --help` and bad settings answer fast

    from llmproxy.protocol import ProxyHttpProtocol
    from llmproxy.websocket_protocol import websocket_server_options

    with contextlib.ExitStack() as cleanup:
        if configuration.workers > 1 and not os.environ.get(MULTIPROCESS_ENV):
            # Set before the workers start: each one's metrics go to files here, and /metrics
            # in any worker sums them.
            os.environ[MULTIPROCESS_ENV] = cleanup.enter_context(
                tempfile.TemporaryDirectory(prefix="llmproxy-metrics-")
            )
        uvicorn.run(
            "llmproxy.cli:create_served_app",
            log_config=logging_config(log_level),
            factory=True,
            host=configuration.host,
            port=configuration.port,
            workers=configuration.workers,
            loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            http=ProxyHttpProtocol,  # uvicorn's httptools protocol, hardened
            **websocket_server_options(configuration.max_ws_message_bytes),
            log_level=log_level,
            access_log=False,  # one log line per request is the proxy's own job
            server_header=False,  # the upstream's Server and Date headers pass through instead
            date_header=False,
            # Clients' X-Forwarded-For must not rewrite the peer address (and costs per request).
            proxy_headers=False,
            # On SIGTERM uvicorn stops accepting, lets in-flight requests run this long, then
            # cancels them; the forwarder ends a cancelled stream with the error event.
            timeout_graceful_shutdown=math.ceil(configuration.drain_timeout),
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `llmproxy` command."""
    arguments = build_parser().parse_args(argv)
    if arguments.command == "demo":
        from llmproxy.demo import run_demo

        raise SystemExit(run_demo())

    flags = given_flags(arguments)
    try:
        # Validated here with the flags as the user spelled them, so errors name the flag.
        configuration = load_configuration(os.environ, flags, arguments.config)
    except ConfigurationError as error:
        _fail(str(error))
    export_flags(flags, arguments.config)
    if not configuration.proxy_access_keys() and configuration.host not in LOOPBACK_HOSTS:
        print(
            f"llmproxy: warning: listening on {configuration.host} without access keys: anyone "
            "who can reach it can spend the upstream key (set LLMPROXY_ACCESS_KEYS)",
            file=sys.stderr,
        )
    serve(configuration, arguments.log_level)
