"""Running short of descriptors or memory in the parent: noticed, logged now and then, survived.

The parent holds a descriptor per child (its report pipe), per control-socket or HTTP client, and opens
more for a moment (psutil reads /proc, a fork needs a pipe). Under a low ``RLIMIT_NOFILE`` (``ulimit -n``,
systemd's ``LimitNOFILE=``) a few held connections are enough to make ``pipe()``, ``accept()`` or ``open()``
fail with EMFILE. None of that may end the loop: the supervisor's teardown SIGKILLs every child. So each
place that can fail that way treats the failure as transient (a failed start, a pause in accepting, a tick
skipped) and says so in one line, at most once a minute for the same cause (`Throttle`): a loop that fails
every 0.5 s must not flood the journal.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Hashable

#: errno values that mean "out of a resource, try later" rather than a bug.
SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
LOG_EVERY = 60.0  # seconds between two log lines for the same cause


def is_shortage(error: BaseException) -> bool:
    """Whether `error` says the process (EMFILE) or the system (ENFILE) is out of descriptors, or memory."""
    return isinstance(error, OSError) and error.errno in SHORTAGE_ERRNOS


class Throttle:
    """Whether to log a cause again: the first time, then at most once per `interval` seconds per key.

    ``suppressed(key)`` says how many times the cause came back unlogged since its last line."""

    def __init__(self, interval: float = LOG_EVERY) -> None:
        self.interval = interval
        self._last: dict[Hashable, float] = {}
        self._count: dict[Hashable, int] = {}

    def allow(self, key: Hashable, now: float | None = None) -> bool:
        """True if a line for `key` is due now (and count it as logged); False: stay quiet (counted)."""
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._count[key] = self._count.get(key, 0) + 1
            return False
        self._last[key] = now
        return True

    def suppressed(self, key: Hashable) -> int:
        """How many times `key` came back unlogged since its last line (reset by this call)."""
        return self._count.pop(key, 0)
