"""One place in a worker pool and the life of the children that occupy it, one after another.

The slot decides, the arbiter acts: every method here is pure (no fork, no signal, no descriptor). It
moves the slot through the state machine of `djsupervisor.supervisor.states` and returns what the arbiter
has to do about it: `stop` returns the signal to send, `exited` an `Outcome` (respawn now, restart at a
time, retire, stay down; whether the dead child's jobs need a recovery; the log line). Keeping the rules
here, apart from fork and signals, is what lets a test drive a slot through every path without processes.

A child is STARTING until it completes its first cycle or job; a slot whose children keep exiting before
that goes FATAL after `fatal_after` tries and is not restarted (until a reload rolls it). A child that got
going is always replaced (policy permitting): at once after its first crash, then after a restart delay
that doubles with each crash in a row, with jitter, and starts over once a child has been up for
`stable_after` seconds.

A child that dies in a job is a job failure, not a start-up failure: the job (`died_job`, with how the
child died) goes to the next child, which counts it toward the job's `max_attempts`
(`djsupervisor.worker.dead_jobs`); the slot's `fatal_after` and restart delay do not count it, and the
child is replaced at once. One poison key thus costs a few restarts of one slot, never the pool.
"""

from __future__ import annotations

import dataclasses
import enum
import random
import signal
import time
from collections.abc import Iterable
from typing import Any, Protocol

from djsupervisor.protocol import MAX_CHILD_REPORT_BYTES, ChildReport, ChildReportMessage, LineDecoder
from djsupervisor.supervisor.config import WorkerConfig
from djsupervisor.supervisor.fork import EXIT_RECYCLE, describe_exit
from djsupervisor.supervisor.gpu_memory import GpuReading, slot_fields
from djsupervisor.supervisor.gpus import gpu_for_slot
from djsupervisor.supervisor.states import TRANSITIONS, SlotState, StopIntent

__all__ = ["InvalidTransition", "Outcome", "RestartRules", "Slot", "SlotState", "Then", "restart_delay"]


class InvalidTransition(RuntimeError):
    """A state change the state machine does not allow (a bug in the supervisor)."""


class RestartRules(Protocol):
    """The supervisor-wide restart settings a slot's exit rules read (`SupervisorConfig` has them)."""

    @property
    def backoff_initial(self) -> float: ...
    @property
    def backoff_max(self) -> float: ...
    @property
    def stable_after(self) -> float: ...
    @property
    def fatal_after(self) -> int: ...


class Then(enum.Enum):
    """What the arbiter does once a slot's child is gone."""

    RESPAWN = "respawn"  # start a new child in it now
    BACKOFF = "backoff"  # start one at `Outcome.restart_at` (the pool does, once due)
    RETIRE = "retire"  # take the slot out of its pool
    STAY = "stay"  # leave it down (STOPPED, EXITED or FATAL)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a child's exit leads to, and the log line that says so (`message` with loguru's ``{}``
    placeholders, filled from `args`, at `level`). `recover`: the child may have left jobs reserved and
    no child of this slot will start soon to recover them, so the arbiter runs a job recovery."""

    then: Then
    message: str
    args: tuple[Any, ...] = ()
    level: str = "INFO"
    recover: bool = False
    restart_at: float | None = None  # monotonic, for Then.BACKOFF


def restart_delay(crashes: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Delay before restarting after the `crashes`-th crash in a row: doubling from `initial`, capped at
    `maximum`, with "equal jitter" (between half and all of it) so that pools do not restart in step."""
    if crashes <= 0 or initial <= 0:
        return 0.0
    base: float = min(maximum, initial * 2.0 ** min(crashes - 1, 32))
    return base / 2 + (rng or random).uniform(0, base / 2)


@dataclasses.dataclass(eq=False)  # a slot is an entity: two are the same slot only if they are one object
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
    last_exit: str = ""  # how the last child ended ("exit status 3", "killed by SIGKILL")
    spawned_once: bool = False
    stop_intent: StopIntent = StopIntent.STAY  # what to do once the stopped child is gone
    stop_reason: str = ""
    kill_reason: str = ""  # set when the supervisor SIGKILLed the child (hang, job_timeout)
    timed_out_job: dict[str, Any] | None = None  # set by the monitor's job_timeout kill: {"table", "key", "seconds"}
    stop_overran: bool = False  # the graceful stop ran past graceful_timeout: SIGKILLed
    died_job: dict[str, Any] | None = None  # the job the last child died in, for the next one (`dead_job`)
    # distinct jobs children died in before getting going, none completing a job since: a make() that kills
    # every process (a broken deploy) makes the slot FATAL after `fatal_after` of them; one poison key never
    deadly_jobs: set[str] = dataclasses.field(default_factory=set)
    next_start: float | None = None  # monotonic deadline of a BACKOFF
    report: ChildReport = dataclasses.field(default_factory=ChildReport)
    last_report: float = 0.0  # monotonic
    last_report_wall: float | None = None
    rss_mb: float | None = None
    cpu_percent: float | None = None
    gpu_reading: GpuReading | None = None  # GPU memory at the last sample (GPU pools, max_gpu_memory_mb)
    rolled: bool = False  # restarted by a config roll, not yet RUNNING
    jobs_done_before: int = 0  # by this slot's earlier children (a child's own counts start at 0)
    jobs_failed_before: int = 0

    @property
    def label(self) -> str:
        """``worker[index]``, as in process titles and logs."""
        return f"{self.worker}[{self.index}]"

    def change(self, new: SlotState) -> SlotState:
        """Move to state `new` (InvalidTransition if the state machine does not allow it); returns the old one."""
        old = self.state
        if new is not old and new not in TRANSITIONS[old]:
            raise InvalidTransition(f"{self.label}: {old.value} -> {new.value}")
        self.state = new
        return old

    # ----- what the pool asks

    def due(self, now: float) -> bool:
        """Whether a child should be started here now: the slot is new or stopped, or its restart delay passed."""
        if self.state is SlotState.BACKOFF:
            return self.next_start is not None and self.next_start <= now
        return self.state is SlotState.STOPPED

    @property
    def retiring(self) -> bool:
        """Whether the slot leaves its pool once its child is gone."""
        return self.stop_intent is StopIntent.RETIRE

    def reset(self) -> None:
        """Forget the exits in a row: a new definition starts afresh (a FATAL slot may be started again)."""
        self.early_exits = self.crashes = 0
        self.deadly_jobs.clear()

    # ----- the life of a child

    def spawned(self, pid: int, pipe_fd: int, now: float, wall: float | None = None) -> None:
        """A new child was forked into this slot at monotonic time `now`: STARTING."""
        if self.state is SlotState.FATAL and self.early_exits:
            raise InvalidTransition(f"{self.label}: fatal, and not reset")
        self.change(SlotState.STARTING)
        if self.spawned_once:
            self.restarts += 1
        self.spawned_once = True
        self.pid, self.pipe_fd, self.reports = pid, pipe_fd, LineDecoder(MAX_CHILD_REPORT_BYTES)
        self.started, self.started_wall = now, time.time() if wall is None else wall
        self.last_report = now
        self.last_report_wall = None
        self.jobs_done_before, self.jobs_failed_before = self.jobs_done_total, self.jobs_failed_total
        self.report = ChildReport()
        self.stop_intent, self.stop_reason, self.kill_reason = StopIntent.STAY, "", ""
        self.timed_out_job, self.died_job, self.stop_overran = None, None, False  # died_job: handed to this child
        self.rss_mb = self.cpu_percent = self.gpu_reading = None

    def spawn_failed(
        self, rules: RestartRules, now: float, why: str = "fork failed", shortage: bool = False
    ) -> Outcome:
        """The start failed (`why`): counts as a child that exited before getting going; but for a `shortage`
        of the parent's (no descriptor for the report pipe: EMFILE), which says nothing of the worker, the
        slot backs off without coming nearer to FATAL."""
        self.change(SlotState.STARTING)
        if not shortage:
            return self._crashed(why, False, rules, now)
        self.crashes += 1
        delay = restart_delay(self.crashes, rules.backoff_initial, rules.backoff_max)
        self.change(SlotState.BACKOFF)
        self.next_start = now + delay
        message = "{} could not start ({}); retrying in {:.2f} s"
        return Outcome(Then.BACKOFF, message, (self.label, why, delay), "ERROR", restart_at=self.next_start)

    def reported(self, reports: Iterable[ChildReportMessage], now: float, wall: float | None = None) -> bool:
        """The child sent `reports` (its latest counters, in order) at monotonic time `now`; whether that
        changed the slot's state (a first cycle or job: RUNNING)."""
        for report in reports:
            self.report.merge(report)
        self.last_report = now
        self.last_report_wall = time.time() if wall is None else wall
        if self.state is SlotState.STARTING and self.got_going():
            self.change(SlotState.RUNNING)
            self.early_exits = 0
            self.rolled = False
            return True
        return False

    def exited(self, code: int, rules: RestartRules, now: float, *, stopping: bool) -> Outcome:
        """The child ended with exit code `code` (negative: killed by that signal); `stopping`: the
        supervisor is stopping, so nothing is restarted."""
        how = self.last_exit = describe_exit(code)
        got_going = self.got_going()
        uptime = self.uptime(now) or 0.0
        self.died_job = self.dead_job(code, how)
        if self.report.jobs_done or self.report.jobs_failed:  # this child's make() ran and returned
            self.deadly_jobs.clear()
        self.pid = self.pipe_fd = None
        if self.state is SlotState.STOPPING:
            self.change(SlotState.STOPPED)
            if self.stop_intent is StopIntent.RETIRE:
                then = Then.RETIRE  # even while the supervisor stops: the slot is done with
            elif self.stop_intent is StopIntent.RESPAWN and not stopping:
                then = Then.RESPAWN
            else:
                then = Then.STAY
            return Outcome(
                then,
                "{} stopped ({}; {}) after {:.1f} s",
                (self.label, self.kill_reason or self.stop_reason, how, uptime),
                recover=code != 0 and then is not Then.RESPAWN,  # killed, and no replacement will recover
            )
        if stopping:
            self.change(SlotState.EXITED)
            return Outcome(Then.STAY, "{} exited ({}) while stopping", (self.label, how), recover=code != 0)
        if code == EXIT_RECYCLE:
            self.change(SlotState.BACKOFF)
            self.next_start = now
            message = "{} reached max_jobs ({}); replacing it"
            return Outcome(Then.BACKOFF, message, (self.label, self.config.max_jobs), restart_at=now)
        policy = self.config.restart
        if policy == "never" or (policy == "on-failure" and code == 0):
            self.change(SlotState.EXITED)
            message = "{} exited ({}) after {:.1f} s; restart={}: not restarted"
            return Outcome(Then.STAY, message, (self.label, how, uptime, policy), recover=code != 0)
        if uptime >= rules.stable_after:
            self.crashes = 0
        if code == 0 and got_going:  # the worker's loop ended by itself (run_duration, max_idled_cycle)
            self.crashes = 0
        if self.died_job is not None:  # the job's failure (its attempts count it), not the slot's: replace at once
            self.early_exits = 0
            if not got_going:
                self.deadly_jobs.add(repr((self.died_job["table"], sorted(self.died_job["key"].items()))))
            if len(self.deadly_jobs) >= rules.fatal_after:
                self.change(SlotState.FATAL)
                message = (
                    "{} died in {} different jobs in a row before completing one (last: {}): FATAL, not restarted "
                    "(a make() that kills every process it runs in?)"
                )
                return Outcome(Then.STAY, message, (self.label, len(self.deadly_jobs), how), "ERROR", recover=True)
            self.change(SlotState.BACKOFF)
            self.next_start = now
            message = "{} died in a job ({} after {:.1f} s); replacing it"
            return Outcome(Then.BACKOFF, message, (self.label, how, uptime), "WARNING", restart_at=now)
        return self._crashed(f"{how} after {uptime:.1f} s", got_going, rules, now)

    def dead_job(self, code: int, how: str) -> dict[str, Any] | None:
        """The job the child ending with `code` (`how`) died in, for the next child to settle; None if it
        was in none or ended by itself."""
        report = self.report
        if code == 0 or code == EXIT_RECYCLE or report.key is None or not report.table:
            return None
        job: dict[str, Any] = {"table": report.table, "key": report.key, "pid": self.pid}
        if self.timed_out_job is not None:
            return {**job, "kind": "timeout", "reason": f"after {self.timed_out_job['seconds']:g} s"}
        if self.stop_overran:
            return {**job, "kind": "stopped", "reason": f"{how} at the end of a graceful stop"}
        rss = ""
        if self.rss_mb is not None:
            rss = f", RSS {self.rss_mb / 1024:.1f} GiB" if self.rss_mb >= 1024 else f", RSS {self.rss_mb:.0f} MiB"
        killed = f" by djsupervisor: {self.kill_reason}" if self.kill_reason else ""
        return {**job, "kind": "died", "reason": f"{how}{rss}{killed}"}

    def _crashed(self, what: str, got_going: bool, rules: RestartRules, now: float) -> Outcome:
        """An exit the restart rules handle: BACKOFF with a growing delay, or FATAL after too many early ones."""
        self.early_exits = 0 if got_going else self.early_exits + 1
        if self.early_exits >= rules.fatal_after:
            self.change(SlotState.FATAL)
            message = "{} exited ({}) before completing a cycle, {} times in a row: FATAL, not restarted"
            return Outcome(Then.STAY, message, (self.label, what, self.early_exits), level="ERROR", recover=True)
        self.crashes += 1
        # a child that got going is replaced at once after one crash; crashes in a row back off
        delay = restart_delay(self.crashes - got_going, rules.backoff_initial, rules.backoff_max)
        self.change(SlotState.BACKOFF)
        self.next_start = now + delay
        early = "" if got_going else " before completing a cycle"
        message = "{} exited ({}){}; restarting in {:.2f} s"
        return Outcome(Then.BACKOFF, message, (self.label, what, early, delay), "WARNING", restart_at=self.next_start)

    def stop(self, reason: str, intent: StopIntent, *, fast: bool = False) -> signal.Signals | None:
        """Stop the slot's child for `reason`, then `intent`: the signal to send (SIGTERM to the child, or
        SIGKILL to its process group if `fast`), None if there is nothing to send (no child: the slot is
        STOPPED now; or a graceful stop already under way). During a stop the intent only grows stronger."""
        if intent > self.stop_intent or self.state is not SlotState.STOPPING:
            self.stop_intent = intent
        if self.pid is None:
            if self.state is not SlotState.STOPPED:
                self.change(SlotState.STOPPED)
            return None
        if fast:
            if self.state is not SlotState.STOPPING:
                self.change(SlotState.STOPPING)
                self.stop_reason = reason
            self.kill_reason = self.kill_reason or reason
            return signal.SIGKILL
        if self.state is SlotState.STOPPING:
            return None
        self.change(SlotState.STOPPING)
        self.stop_reason = reason
        return signal.SIGTERM

    def stop_overdue(self, pid: int, reason: str) -> bool:
        """The graceful stop of child `pid` ran out of time: whether that child is still the one being
        stopped here (then its process group is to be SIGKILLed, for `reason`)."""
        if self.pid != pid or self.state is not SlotState.STOPPING:
            return False
        self.kill_reason = reason
        self.stop_overran = True
        return True

    # ----- what is known of the child

    @property
    def jobs_done_total(self) -> int:
        """Jobs done by every child this slot has had."""
        return self.jobs_done_before + self.report.jobs_done

    @property
    def jobs_failed_total(self) -> int:
        """Jobs failed in every child this slot has had."""
        return self.jobs_failed_before + self.report.jobs_failed

    def got_going(self) -> bool:
        """Whether the current child completed a cycle or a job (it is working normally)."""
        return self.report.got_going

    def uptime(self, now: float | None = None) -> float | None:
        """Seconds the current child has been up (None without one)."""
        if self.pid is None:
            return None
        return (time.monotonic() if now is None else now) - self.started

    def status(self, now: float) -> dict[str, Any]:
        """This slot's line of the supervisor's status."""
        report = self.report
        uptime = self.uptime(now)
        return {
            "worker": self.worker,
            "slot": self.index,
            "pid": self.pid,
            "state": self.state.value,
            "activity": report.activity,
            "uptime": round(uptime, 3) if uptime is not None else None,
            "restarts": self.restarts,
            "rss_mb": round(self.rss_mb, 1) if self.rss_mb is not None else None,
            "cpu_percent": round(self.cpu_percent, 1) if self.cpu_percent is not None else None,
            "table": report.table,
            "key": report.key,
            "jobs_done": report.jobs_done,
            "jobs_failed": report.jobs_failed,
            "jobs_done_total": self.jobs_done_total,
            "jobs_failed_total": self.jobs_failed_total,
            "last_heartbeat": self.last_report_wall,
            **slot_fields(gpu_for_slot(self.config, self.index), self.gpu_reading),
        }
