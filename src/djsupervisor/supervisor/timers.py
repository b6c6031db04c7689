"""The arbiter's timers: a heap of monotonic deadlines that sets its select timeout.

One heap and no timer thread: the loop sleeps in `select` until the earliest deadline, then runs what is
due, so every callback runs in the loop like everything else (no locks). The supervisor has a handful of
periodic ticks and one deadline per stopping child: a heap of a few dozen entries.

A callback that raises does not end the loop (the supervisor's teardown would SIGKILL every child): the
error is logged (at most once a minute per callback and cause, `shortage.Throttle`) and a periodic tick
runs again at its next interval. The usual cause is a transient one, such as EMFILE under a low
``RLIMIT_NOFILE`` while clients hold connections (psutil cannot open /proc, a restart cannot make its pipe).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

from djsupervisor.supervisor.shortage import Throttle, is_shortage


def _name(callback: Callable[[], object]) -> str:
    func = getattr(callback, "func", callback)  # functools.partial
    return getattr(func, "__qualname__", None) or repr(func)


class Timers:
    """A heap of deadlines (monotonic seconds) with callbacks; `log` takes the lines about failed ones."""

    def __init__(self, log: Any = None) -> None:
        self._heap: list[tuple[float, int, Callable[[], object]]] = []
        self._seq = itertools.count()  # ties run in the order they were set, and callbacks are never compared
        self.log = log if log is not None else logger.bind(supervisor="-", worker="-", slot="-")
        self._throttle = Throttle()
        self.failures = 0  # callbacks that raised, in all

    def call_at(self, deadline: float, callback: Callable[[], object]) -> None:
        """Run `callback` in the loop once `deadline` has passed."""
        heapq.heappush(self._heap, (deadline, next(self._seq), callback))

    def every(self, interval: float, callback: Callable[[], object]) -> None:
        """Run `callback` every `interval` seconds, the first time `interval` from now (a slow callback
        delays the next run rather than having runs pile up; one that raises runs again all the same)."""

        def tick() -> None:
            try:
                self._guarded(callback, f"it runs again in {interval:g} s")
            finally:
                self.call_at(time.monotonic() + interval, tick)

        tick.__qualname__ = _name(callback)
        self.call_at(time.monotonic() + interval, tick)

    def timeout(self, now: float) -> float | None:
        """Seconds until the next deadline (0 if one is due, None without timers)."""
        return max(0.0, self._heap[0][0] - now) if self._heap else None

    def run_due(self, now: float) -> bool:
        """Run the callbacks whose deadline has passed; whether there were any."""
        ran = False
        while self._heap and self._heap[0][0] <= now:
            _, _, callback = heapq.heappop(self._heap)
            self._guarded(callback, "the loop goes on")
            ran = True
        return ran

    def _guarded(self, callback: Callable[[], object], then: str) -> None:
        try:
            callback()
        except Exception as error:
            self.failures += 1
            name = _name(callback)
            key = (name, type(error), getattr(error, "errno", None))
            if not self._throttle.allow(key):
                return
            again = self._throttle.suppressed(key)
            more = f" (and {again} times since it was last said)" if again else ""
            if is_shortage(error):  # a known, transient cause: one line, no traceback
                self.log.error("timer {} failed: {}; {}{}", name, error, then, more)
            else:
                self.log.opt(exception=error).error("timer {} failed: {!r}; {}{}", name, error, then, more)
