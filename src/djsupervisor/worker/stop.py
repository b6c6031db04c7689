"""How a stop reaches a worker's loop: `DataJointWorker.stop()` from any thread, or SIGTERM.

The loop only ever stops at a job boundary (the job in flight finishes, no new one starts), so a stop is a
flag the loop reads, never an exception. SIGTERM becomes that flag in one of two ways, chosen when
`run()` starts:

* **blocked**: a supervisor's child blocks SIGTERM right after fork, so that every thread inherits the
  block and DataJoint's populate handler never runs; a pending SIGTERM is read (and consumed) whenever
  the flag is asked for, and the sleep between cycles waits on it with ``sigtimedwait``;
* **handler**: in the main thread of a process run by hand, a handler sets the flag. DataJoint's
  ``populate()`` installs its own SIGTERM handler (which would abort the job in flight and record it as
  an error), so ours is put back at every job boundary, and the previous one restored when `run()` ends.

Elsewhere (a worker run in another thread) only `stop()` stops the loop.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any, Literal

_STOP_POLL_INTERVAL = 0.25  # how often a sleep looks for a stop requested from another thread

SigtermMode = Literal["blocked", "handler"]


class StopSignal:
    """The stop flag of one worker, and how SIGTERM sets it while `run()` listens."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self.mode: SigtermMode | None = None  # how SIGTERM reaches the loop now; None outside run()
        self._previous_handler: Any = None
        self._handler = self._on_sigterm  # one bound method, so that `is` recognises it

    @property
    def requested(self) -> bool:
        """True once a stop was requested or (while SIGTERM is blocked in this thread) SIGTERM arrived."""
        if self._event.is_set():
            return True
        if self.mode == "blocked" and signal.SIGTERM in signal.sigpending():
            signal.sigtimedwait([signal.SIGTERM], 0)  # consume it: it has been turned into this stop
            self.request("SIGTERM")
            return True
        return False

    def request(self, reason: str = "") -> None:
        """Set the flag (the first reason given is kept); safe from other threads and signal handlers."""
        if not self._event.is_set():
            self.reason = reason or "stop requested"
            self._event.set()

    def clear(self) -> None:
        """Forget a stop requested earlier (the next `run()` starts afresh)."""
        self._event.clear()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.request("SIGTERM")

    def listen(self) -> None:
        """Start turning SIGTERM into a stop (at the start of `run()`), the way the module docstring says."""
        if signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []):
            self.mode = "blocked"
        elif threading.current_thread() is threading.main_thread():
            self.mode = "handler"
            self._previous_handler = signal.signal(signal.SIGTERM, self._handler)

    def guard_handler(self) -> None:
        """Put our SIGTERM handler back if DataJoint's populate replaced it (called at each job boundary)."""
        if self.mode == "handler" and signal.getsignal(signal.SIGTERM) is not self._handler:
            signal.signal(signal.SIGTERM, self._handler)

    def close(self) -> None:
        """Stop listening (at the end of `run()`): the previous SIGTERM handler back, the flag cleared."""
        if self.mode == "handler":
            signal.signal(signal.SIGTERM, self._previous_handler)
        self.mode = None
        self._previous_handler = None
        self._event.clear()

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, waking at once for a stop or SIGTERM."""
        deadline = time.monotonic() + seconds
        while not self.requested:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self.mode == "blocked":
                if signal.sigtimedwait([signal.SIGTERM], min(remaining, _STOP_POLL_INTERVAL)) is not None:
                    self.request("SIGTERM")
            else:
                self._event.wait(min(remaining, _STOP_POLL_INTERVAL))
