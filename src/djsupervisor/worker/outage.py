"""How a worker rides out a database outage: count the failed calls of a cycle, back off, reconnect.

A worker must neither spin nor give up while its server is away. Every call that fails for want of the
server (a populate, a heartbeat, job recovery, ...) is counted during the cycle; after a cycle with any,
the loop sleeps at least a backoff that starts at 1 s and doubles per such cycle up to 30 s, and the next
cycle first reconnects the sessions the driver has given up on (psycopg2 does not reconnect by itself;
DataJoint reconnects a MySQL session on its next query). The first cycle that reaches the server again
resets the backoff.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import datajoint as dj
from loguru import logger

from djsupervisor.worker.compat import session_alive
from djsupervisor.worker.connection import is_connection_error

_OUTAGE_BACKOFF_FIRST = 1.0  # seconds to wait after a cycle that could not reach the server...
_OUTAGE_BACKOFF_MAX = 30.0  # ...doubling per such cycle up to this

#: Runs an action, logging and counting a failure instead of raising: (what, action) -> its result or None.
Attempt = Callable[[str, Callable[[], Any]], Any]


class OutageTracker:
    """The failed calls of the current cycle and the backoff they earned, for worker `worker_name`."""

    def __init__(self, worker_name: str) -> None:
        self.worker_name = worker_name
        self.errors = 0  # calls that could not reach the server, in the current cycle
        self.backoff = 0.0  # seconds the next sleep lasts at least; 0 while the server is reachable

    def note(self, error: BaseException) -> None:
        """Count `error` if it says the server is unreachable or the session was lost."""
        if is_connection_error(error):
            self.errors += 1

    def start_cycle(self) -> None:
        """Forget the failed calls of the previous cycle."""
        self.errors = 0

    def reconnect_lost(self, connections: Iterable[dj.Connection], attempt: Attempt) -> None:
        """During an outage, reconnect each of `connections` whose session is gone, through `attempt` (which
        logs and counts a failure instead of raising); outside one, do nothing."""
        if self.backoff:
            for connection in connections:
                if not session_alive(connection):
                    attempt("reconnecting", connection.connect)

    def end_cycle(self) -> None:
        """Grow the backoff after a cycle that could not reach the server; reset it after one that did."""
        log = logger.bind(worker=self.worker_name)
        if self.errors:
            self.backoff = min(max(self.backoff * 2, _OUTAGE_BACKOFF_FIRST), _OUTAGE_BACKOFF_MAX)
            log.warning(
                "database unreachable ({} failed calls this cycle); next cycle in at least {:.0f} s",
                self.errors,
                self.backoff,
            )
        elif self.backoff:
            log.info("database reachable again")
            self.backoff = 0.0
