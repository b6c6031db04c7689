"""The arbiter's timers: a heap of monotonic deadlines that sets its select timeout.

One heap and no timer thread: the loop sleeps in `select` until the earliest deadline, then runs what is
due, so every callback runs in the loop like everything else (no locks). The supervisor has a handful of
periodic ticks and one deadline per stopping child: a heap of a few dozen entries.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable


class Timers:
    """A heap of deadlines (monotonic seconds) with callbacks."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], object]]] = []
        self._seq = itertools.count()  # ties run in the order they were set, and callbacks are never compared

    def call_at(self, deadline: float, callback: Callable[[], object]) -> None:
        """Run `callback` in the loop once `deadline` has passed."""
        heapq.heappush(self._heap, (deadline, next(self._seq), callback))

    def every(self, interval: float, callback: Callable[[], object]) -> None:
        """Run `callback` every `interval` seconds, the first time `interval` from now (a slow callback
        delays the next run rather than having runs pile up)."""

        def tick() -> None:
            callback()
            self.call_at(time.monotonic() + interval, tick)

        self.call_at(time.monotonic() + interval, tick)

    def timeout(self, now: float) -> float | None:
        """Seconds until the next deadline (0 if one is due, None without timers)."""
        return max(0.0, self._heap[0][0] - now) if self._heap else None

    def run_due(self, now: float) -> bool:
        """Run the callbacks whose deadline has passed; whether there were any."""
        ran = False
        while self._heap and self._heap[0][0] <= now:
            _, _, callback = heapq.heappop(self._heap)
            callback()
            ran = True
        return ran
