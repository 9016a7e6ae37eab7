"""File descriptors: as many as the system allows, and a warning when they run out (DESIGN §13).

Every client and upstream connection is a descriptor. The soft `RLIMIT_NOFILE` (often 1,024) is
raised to the hard limit at start-up, as nginx's `worker_rlimit_nofile` does. When descriptors
run out anyway, new connections fail where nobody sees them: uvloop (libuv) accepts and closes
them silently, asyncio logs a traceback per failed accept. `DescriptorWatch` notices it itself,
by a probe once a second, and logs one warning a minute while it lasts.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sys
from typing import Any

logger = logging.getLogger("llmproxy")

WARNING_INTERVAL = 60.0  # seconds between two warnings while descriptors stay exhausted
PROBE_INTERVAL = 1.0  # seconds between two probes

_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE})


def raise_descriptor_limit() -> tuple[int, int] | None:
    """Raise the soft RLIMIT_NOFILE to the hard one; (old soft, new soft), or None if unchanged."""
    if sys.platform == "win32":  # pragma: no cover - no RLIMIT_NOFILE there
        return None
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    # Linux refuses an infinite soft limit; its real ceiling is fs.nr_open.
    wanted = hard if hard != resource.RLIM_INFINITY else _system_descriptor_cap()
    if wanted <= soft:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):
        return None
    return soft, wanted


def _system_descriptor_cap() -> int:
    """The most descriptors one process may have on this system (Linux's fs.nr_open)."""
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 1024 * 1024


def should_warn(last_warned: float | None, now: float, interval: float = WARNING_INTERVAL) -> bool:
    """Whether a new warning is due: the first one, or `interval` seconds after the last."""
    return last_warned is None or now - last_warned >= interval


def is_exhaustion(error: BaseException | None) -> bool:
    """Whether `error` says the process or the system is out of file descriptors."""
    return isinstance(error, OSError) and error.errno in _EXHAUSTED


class DescriptorWatch:
    """Notices descriptor exhaustion in a running server and warns about it, once a minute.

    Two sources: a probe (opening `/dev/null` once a second fails with EMFILE while the process
    is out of descriptors, whatever the event loop does with failed accepts), and asyncio's own
    accept errors, which would otherwise be logged with a traceback each.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._last_warned: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._previous_handler: Any = None

    def start(self) -> None:
        self._previous_handler = self._loop.get_exception_handler()
        self._loop.set_exception_handler(self._exception_handler)
        self._timer = self._loop.call_later(PROBE_INTERVAL, self._probe)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop.get_exception_handler() == self._exception_handler:
            self._loop.set_exception_handler(self._previous_handler)

    def exhausted(self, error: OSError) -> None:
        """Record that descriptors ran out; warn if the last warning is a minute old."""
        now = self._loop.time()
        if not should_warn(self._last_warned, now):
            return
        self._last_warned = now
        limit = _soft_limit()
        logger.warning(
            "out of file descriptors (%s; limit %s): new connections are being dropped. "
            "Raise the hard RLIMIT_NOFILE (ulimit -Hn) or lower client_header_timeout.",
            os.strerror(error.errno or errno.EMFILE),
            limit if limit is not None else "unknown",
        )

    def _probe(self) -> None:
        try:
            os.close(os.open(os.devnull, os.O_RDONLY))
        except OSError as error:
            if is_exhaustion(error):
                self.exhausted(error)
        self._timer = self._loop.call_later(PROBE_INTERVAL, self._probe)

    def _exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if is_exhaustion(error):
            assert isinstance(error, OSError)
            self.exhausted(error)  # asyncio's "socket.accept() out of system resource"
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)


def _soft_limit() -> int | None:
    if sys.platform == "win32":  # pragma: no cover
        return None
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
