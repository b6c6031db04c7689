"""One place in a worker pool and the life of the children that occupy it, one after another.

The states follow supervisord's (``states.py``)::

    STOPPED ──spawn──▶ STARTING ──first cycle or job done──▶ RUNNING
       ▲                  │  └──────────────┐                  │
       │                  ▼ exits early     ▼ stop requested   │ exits / is killed
       │   FATAL ◀── BACKOFF ◀──────────── STOPPING ◀──────────┤
       │  (gave up)  (delay, then spawn)      │                ▼
       └──────────────────────────────────────┘              EXITED (policy says: stay down)

A child is STARTING until it completes its first cycle or job; a slot whose children keep exiting before
that goes FATAL after `fatal_after` tries and is not restarted. A child that got going is always
replaced (policy permitting), after a restart delay that doubles with each crash, with jitter, and starts
over once a child has been up for `stable_after` seconds. Transitions are checked in `Slot.change`.
"""

from __future__ import annotations

import dataclasses
import enum
import random
import time
from typing import Any

from djsupervisor.protocol import MAX_CHILD_REPORT_BYTES, ChildReport, LineDecoder
from djsupervisor.supervisor.config import WorkerConfig


class SlotState(str, enum.Enum):
    """States of a slot (see the module docstring)."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FATAL = "fatal"


#: States in which the slot has a live child.
LIVE_STATES = frozenset({SlotState.STARTING, SlotState.RUNNING, SlotState.STOPPING})

_ALLOWED = {
    SlotState.STOPPED: {SlotState.STARTING},
    SlotState.STARTING: {SlotState.RUNNING, SlotState.STOPPING, SlotState.BACKOFF, SlotState.EXITED, SlotState.FATAL},
    SlotState.RUNNING: {SlotState.STOPPING, SlotState.BACKOFF, SlotState.EXITED},
    SlotState.BACKOFF: {SlotState.STARTING, SlotState.STOPPED, SlotState.FATAL},
    SlotState.STOPPING: {SlotState.STOPPED, SlotState.BACKOFF},
    SlotState.EXITED: {SlotState.STARTING, SlotState.STOPPED},
    SlotState.FATAL: {SlotState.STARTING, SlotState.STOPPED},
}


class InvalidTransition(RuntimeError):
    """A state change the state machine does not allow (a bug in the supervisor)."""


def restart_delay(crashes: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Delay before restarting after the `crashes`-th crash in a row: doubling from `initial`, capped at
    `maximum`, with "equal jitter" (between half and all of it) so that pools do not restart in step."""
    if crashes <= 0 or initial <= 0:
        return 0.0
    base = min(maximum, initial * 2 ** min(crashes - 1, 32))
    return base / 2 + (rng or random).uniform(0, base / 2)


@dataclasses.dataclass
class Slot:
    """A place in pool `worker` at position `index`, and what is known of its current child."""

    worker: str
    index: int
    config: WorkerConfig
    state: SlotState = SlotState.STOPPED
    pid: int | None = None
    pipe_fd: int | None = None
    reports: LineDecoder = dataclasses.field(default_factory=lambda: LineDecoder(MAX_CHILD_REPORT_BYTES))
    started: float = 0.0  # monotonic, of the current child
    started_wall: float = 0.0
    restarts: int = 0  # children started in this slot after the first
    early_exits: int = 0  # consecutive children that exited before completing a cycle
    crashes: int = 0  # consecutive unplanned exits (drives the restart delay)
    spawned_once: bool = False
    after_stop: str = "stay"  # what to do once the child is gone: "respawn", "retire" or "stay"
    stop_reason: str = ""
    stop_deadline: float | None = None
    kill_reason: str = ""  # set when the supervisor SIGKILLed the child (hang, job_timeout)
    timed_out_job: dict | None = None  # handed to the next child: {"table", "key", "seconds"}
    next_start: float | None = None  # monotonic deadline of a BACKOFF
    report: ChildReport = dataclasses.field(default_factory=ChildReport)
    last_report: float = 0.0  # monotonic
    last_report_wall: float | None = None
    rss_mb: float | None = None
    cpu_percent: float | None = None
    rolled: bool = False  # restarted by a config roll, not yet RUNNING
    jobs_done_before: int = 0  # by this slot's earlier children (a child's own counts start at 0)
    jobs_failed_before: int = 0

    @property
    def label(self) -> str:
        """``worker[index]``, as in process titles and logs."""
        return f"{self.worker}[{self.index}]"

    @property
    def live(self) -> bool:
        """Whether a child occupies the slot."""
        return self.pid is not None

    def change(self, new: SlotState) -> SlotState:
        """Move to state `new` (InvalidTransition if the state machine does not allow it); returns the old one."""
        old = self.state
        if new is not old and new not in _ALLOWED[old]:
            raise InvalidTransition(f"{self.label}: {old.value} -> {new.value}")
        self.state = new
        return old

    def occupied(self, pid: int, pipe_fd: int) -> None:
        """A new child was forked into this slot."""
        if self.spawned_once:
            self.restarts += 1
        self.spawned_once = True
        self.pid, self.pipe_fd, self.reports = pid, pipe_fd, LineDecoder(MAX_CHILD_REPORT_BYTES)
        self.started, self.started_wall = time.monotonic(), time.time()
        self.last_report = self.started
        self.last_report_wall = None
        self.jobs_done_before, self.jobs_failed_before = self.jobs_done_total, self.jobs_failed_total
        self.report = ChildReport()
        self.after_stop, self.stop_reason, self.stop_deadline, self.kill_reason = "stay", "", None, ""
        self.rss_mb = self.cpu_percent = None

    @property
    def jobs_done_total(self) -> int:
        """Jobs done by every child this slot has had."""
        return self.jobs_done_before + self.report.jobs_done

    @property
    def jobs_failed_total(self) -> int:
        """Jobs failed in every child this slot has had."""
        return self.jobs_failed_before + self.report.jobs_failed

    def vacated(self) -> None:
        """The child is gone (reaped)."""
        self.pid = None
        self.pipe_fd = None
        self.stop_deadline = None

    def got_going(self) -> bool:
        """Whether the current child completed a cycle or a job (it is working normally)."""
        return self.report.got_going

    def uptime(self, now: float | None = None) -> float | None:
        """Seconds the current child has been up (None without one)."""
        if self.pid is None:
            return None
        return (now or time.monotonic()) - self.started

    def status(self, now: float) -> dict[str, Any]:
        """This slot's line of the supervisor's status."""
        report = self.report
        uptime = self.uptime(now)
        return {
            "worker": self.worker,
            "slot": self.index,
            "pid": self.pid,
            "state": self.state.value,
            "activity": report.get("state"),
            "uptime": round(uptime, 3) if uptime is not None else None,
            "restarts": self.restarts,
            "rss_mb": round(self.rss_mb, 1) if self.rss_mb is not None else None,
            "cpu_percent": round(self.cpu_percent, 1) if self.cpu_percent is not None else None,
            "table": report.get("table"),
            "key": report.get("key"),
            "jobs_done": report.get("jobs_done", 0),
            "jobs_failed": report.get("jobs_failed", 0),
            "jobs_done_total": self.jobs_done_total,
            "jobs_failed_total": self.jobs_failed_total,
            "last_heartbeat": self.last_report_wall,
        }
