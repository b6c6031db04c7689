"""Sending notifications without ever making the worker wait: a bounded queue, one thread, a rate limit.

`Dispatcher.submit` is what the worker's loop calls (and the fleet agent's): it puts the notification on a
queue and returns; it never blocks and never raises. A full queue (1000 by default: a notifier hanging for
its whole timeout while errors pour in) drops the notification and counts it.

One daemon thread, started on the first notification in each process (so a forked child starts its own,
and a process that never notifies has none), sends them. Each notifier has a rate limit:

* the first notification of a quiet spell is held `gather` seconds (2 s by default), so that a burst
  arriving together goes out as one message;
* after a message, the next one waits until `window` seconds (60 by default) have passed; everything that
  arrived meanwhile goes out then, as one summary with the count per table (or pool) and status.

So 500 failing jobs in a few seconds are one message saying 500, not 500 messages (and not a webhook that
throttles us). A message of one notification is sent exactly as datajoint-utilities would have sent it; a
summary keeps the first notification's keyword arguments and adds ``count`` and ``counts``.

A notifier that raises or times out is logged at most once a minute (with how many failures were not
logged); nothing is retried: a notification is news, and a late duplicate helps nobody. `close` flushes
what is pending, ignoring the windows, and waits at most the notifiers' timeouts.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from loguru import logger

from djsupervisor.notify.notifiers import DEFAULT_GATHER, DEFAULT_TIMEOUT, DEFAULT_WINDOW

QUEUE_SIZE = 1000  # notifications waiting to be sent; more are dropped (and counted)
LOG_EVERY = 60.0  # seconds between two log lines about one notifier's failures, or about drops
_CLOSE = object()  # the queue's last item: flush everything and end the thread


@dataclasses.dataclass(frozen=True)
class Notification:
    """One notification: upstream's ``notify(title, message, **kwargs)`` arguments, and what it is about
    (`subject`: a table's ``schema.Table`` or a pool's name; `status`: ``ERROR``, ``FATAL``, ...), which a
    summary counts by. `to`: the dispatcher's notifiers it is for (None: all of them)."""

    title: str
    message: str
    kwargs: Mapping[str, Any]
    subject: str
    status: str
    to: tuple[Any, ...] | None = None

    def is_for(self, notifier: Any) -> bool:
        """Whether `notifier` is to get it."""
        return self.to is None or any(notifier is wanted for wanted in self.to)


def _limit(notifier: Any, name: str, default: float) -> float:
    value = getattr(notifier, name, default)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else default


@dataclasses.dataclass
class _Channel:
    """One notifier and what waits for it (in the sending thread only)."""

    notifier: Any
    window: float
    gather: float
    timeout: float
    first: Notification | None = None
    count: int = 0
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_at: float = 0.0
    last_sent: float = -math.inf

    def add(self, notification: Notification, now: float) -> None:
        if not self.count:
            self.first, self.first_at = notification, now
        self.count += 1
        self.counts[f"{notification.subject} {notification.status}"] += 1

    def due_at(self) -> float:
        """When the pending notifications may go out (inf: none pending)."""
        if not self.count:
            return math.inf
        return max(self.first_at + self.gather, self.last_sent + self.window)

    def take(self, now: float) -> tuple[str, str, dict[str, Any]]:
        """The message for everything pending (the notification itself when alone), and forget it."""
        first, count, counts, span = self.first, self.count, self.counts, now - self.first_at
        assert first is not None
        self.first, self.count, self.counts, self.last_sent = None, 0, collections.Counter(), now
        if count == 1:
            return first.title, first.message, dict(first.kwargs)
        return summary(first, count, counts, span)


def summary(first: Notification, count: int, counts: Mapping[str, int], span: float) -> tuple[str, str, dict]:
    """One message for `count` notifications that came in `span` seconds, `counts` by subject and status."""
    when = f"in {span:.0f} s" if span >= 1 else "at once"
    if len(counts) == 1:
        title = f"{first.title} ({count} {when})"
    else:
        title = f"{count} notifications {when}, first: {first.title}"
    lines = [f"{count} notifications {when}:"]
    lines += [f"  {what}: {n}" for what, n in sorted(counts.items(), key=lambda item: -item[1])]
    lines += ["first:", first.message]
    return title, "\n".join(lines), dict(first.kwargs, count=count, counts=dict(counts))


class _Throttled:
    """Say something at most once per `LOG_EVERY` seconds, with how many times it was not said."""

    def __init__(self) -> None:
        self.last = -math.inf
        self.unsaid = 0

    def due(self) -> int | None:
        """None while quiet; else how many occurrences went unsaid since the last time (and say it now)."""
        now = time.monotonic()
        if now - self.last < LOG_EVERY:
            self.unsaid += 1
            return None
        unsaid, self.last, self.unsaid = self.unsaid, now, 0
        return unsaid


class Dispatcher:
    """Sends `Notification`s to `notifiers` from a background thread, rate limited per notifier.

    Parameters
    ----------
    notifiers : iterable
        Objects with ``notify(title, message, **kwargs)``; each one's ``window``, ``gather`` and ``timeout``
        attributes, where it has them, set its rate limit and how long `close` waits for it.
    name : str
        Who sends (a worker's name, ``fleet agent``), for the log lines.
    queue_size : int
        Notifications that may wait; more are dropped and counted (`dropped`).
    """

    def __init__(self, notifiers: Iterable[Any], *, name: str = "", queue_size: int = QUEUE_SIZE) -> None:
        self.notifiers = tuple({id(n): n for n in notifiers}.values())  # given twice: sends once
        self.name = name
        self.queue_size = queue_size
        self.dropped = 0
        self.sent = 0
        self._queue: queue.Queue = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._drops = _Throttled()
        self._failures: dict[int, _Throttled] = {}

    @property
    def log(self) -> Any:
        return logger.bind(worker=self.name) if self.name else logger

    def submit(self, notification: Notification) -> None:
        """Queue `notification` for every notifier; never blocks, never raises."""
        if not self.notifiers:
            return
        try:
            self._ensure_thread()
            self._queue.put_nowait(notification)
        except queue.Full:
            self.dropped += 1
            unsaid = self._drops.due()
            if unsaid is not None:
                self.log.warning(
                    "notifications: queue full ({} waiting), dropped {} so far", self.queue_size, self.dropped
                )
        except Exception as error:  # nothing about notifying may reach the worker's loop
            self.log.warning("notifications: cannot queue: {}: {}", error.__class__.__name__, error)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            if self._pid != os.getpid():  # forked since: the parent's queue and thread are not ours
                self._queue = queue.Queue(self.queue_size)
            self._pid = os.getpid()
            self._thread = threading.Thread(
                target=self._run, args=(self._queue,), name="djsupervisor-notify", daemon=True
            )
            self._thread.start()

    def close(self, timeout: float | None = None) -> bool:
        """Send what is pending now (windows ignored) and end the thread, waiting at most `timeout` seconds
        (default: the notifiers' timeouts added up, plus one). Returns whether everything went out."""
        with self._lock:
            thread, mine = self._thread, self._pid == os.getpid()
            self._thread = None
        if thread is None or not mine or not thread.is_alive():
            return True
        if timeout is None:
            timeout = sum(_limit(n, "timeout", DEFAULT_TIMEOUT) for n in self.notifiers) + 1.0
        try:
            self._queue.put(_CLOSE, timeout=max(timeout, 0.0))
        except queue.Full:
            pass
        thread.join(timeout)
        if thread.is_alive():
            self.log.warning("notifications: not all sent within {:.1f} s at shutdown", timeout)
            return False
        return True

    # ----- the sending thread

    def _run(self, inbox: queue.Queue) -> None:
        channels = [
            _Channel(
                n,
                window=_limit(n, "window", DEFAULT_WINDOW),
                gather=_limit(n, "gather", DEFAULT_GATHER),
                timeout=_limit(n, "timeout", DEFAULT_TIMEOUT),
            )
            for n in self.notifiers
        ]
        closing = False
        while not closing:
            due = min(channel.due_at() for channel in channels)
            wait = None if due == math.inf else max(due - time.monotonic(), 0.0)
            items = []
            try:
                items.append(inbox.get(timeout=wait))
                while True:  # take the whole burst that is there, so that it counts as one
                    items.append(inbox.get_nowait())
            except queue.Empty:
                pass
            now = time.monotonic()
            for item in items:
                if item is _CLOSE:
                    closing = True
                    continue
                for channel in channels:
                    if item.is_for(channel.notifier):
                        channel.add(item, now)
            for channel in channels:
                if channel.count and (closing or channel.due_at() <= time.monotonic()):
                    self._send(channel)

    def _send(self, channel: _Channel) -> None:
        title, message, kwargs = channel.take(time.monotonic())
        kwargs = {k: v for k, v in kwargs.items() if k not in ("title", "message")}  # a key attribute named so
        try:
            channel.notifier.notify(title=title, message=message, **kwargs)
            self.sent += 1
        except Exception as error:  # a notifier's failure is logged, never raised, never retried
            throttle = self._failures.setdefault(id(channel.notifier), _Throttled())
            unsaid = throttle.due()
            if unsaid is not None:
                more = f" ({unsaid} more failures since the last report)" if unsaid else ""
                text = str(error).splitlines()[0] if str(error) else ""
                self.log.warning(
                    "notifier {!r} failed: {}{}{}", channel.notifier, error.__class__.__name__, f": {text}", more
                )
