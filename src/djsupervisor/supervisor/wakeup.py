"""Signals as bytes on a pipe: how they reach the arbiter's `selectors` loop.

`signal.set_wakeup_fd` makes CPython write each signal's number to a pipe when the signal arrives; the
Python-level handlers installed here do nothing. The loop selects on the pipe's read end and handles the
signals it reads there, in the loop, between two other events: no handler ever runs in the middle of the
loop's bookkeeping (gunicorn queues signals for the same reason).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from typing import Any


def _note_signal(signum: int, frame: Any) -> None:
    """The Python-level handler: nothing; the wakeup fd carries the signal into the loop."""


class SignalWakeup:
    """The wakeup pipe and the handlers it replaced (restored by `close`)."""

    def __init__(self) -> None:
        self.read_fd = self.write_fd = -1
        self._previous: dict[int, Any] = {}

    def install(self, signals: Iterable[int]) -> int:
        """Route `signals` to the pipe; returns its read end, for the selector."""
        self.read_fd, self.write_fd = os.pipe()
        for fd in self.fds():
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for signum in signals:
            self._previous[signum] = signal.signal(signum, _note_signal)
        return self.read_fd

    def fds(self) -> list[int]:
        """The pipe's descriptors (a forked child closes them)."""
        return [fd for fd in (self.read_fd, self.write_fd) if fd >= 0]

    def read(self) -> list[int]:
        """The signals that arrived since the last read, each once (the same signal twice acts once)."""
        try:
            data = os.read(self.read_fd, 512)
        except BlockingIOError:
            return []
        return list(dict.fromkeys(data))

    def close(self) -> None:
        """Restore the previous handlers and close the pipe."""
        if self.write_fd >= 0:
            signal.set_wakeup_fd(-1)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        for fd in self.fds():
            os.close(fd)
        self.read_fd = self.write_fd = -1
