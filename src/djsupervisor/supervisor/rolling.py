"""``djsupervisor restart``: roll pools onto freshly imported worker code, one slot at a time, no downtime.

A reload cannot deploy code: children are forked from a parent that imported the worker modules once. A
restart starts each new child from a fresh interpreter instead (`djsupervisor.supervisor.fresh_child`), and
once a pool has moved, every later child of it starts that way too (crash replacements included): the
parent's copy of the code is stale for good. That is the pool's *generation* (`Restarts.fresh`).

The order, as gunicorn's USR2 upgrade and Kubernetes' ``maxSurge: 1, maxUnavailable: 0`` do it:

1. **Probe**: one short-lived fresh interpreter imports every target to roll and checks it as ``check``
   does. A problem (with the file and line an import error was raised at) ends the restart at once: no
   child has moved.
2. **Roll** each pool, slot by slot: start the new child of slot *i* next to the old one (a surge of one
   process: never more than ``replicas + 1`` children, which matters for memory and GPU pools), wait until
   it has *got going* (completed its first cycle or its first job: what makes a slot RUNNING), then put it
   in the slot and stop the old child gracefully (its job in flight finishes, `graceful_timeout` as for any
   stop); the next slot starts once the old child is gone. Not merely "started its first cycle": a worker
   that dies in its first cycle (a callable that raises SystemExit, a make() that kills its process) would
   pass that test and take every slot down with it.
3. A new child that exits before it got going, or is still not working `FIRST_CYCLE_TIMEOUT` seconds
   after its start (outside a job: a first job may take hours), **halts** the roll: that slot keeps its old
   child, the slots not yet rolled keep theirs, and the reason is the command's answer. Slots already
   rolled stay on the new code.

`Roll` decides (pure, as `Pool` and `Slot`: it returns `Spawn` and `Stop` actions); `Restarts` owns the
probe process, the finished rolls the command polls, and which pools start their children fresh.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import selectors
import signal
import time
from collections.abc import Callable
from typing import Any

from djsupervisor.supervisor.fork import killpg
from djsupervisor.supervisor.monitor import judge
from djsupervisor.supervisor.pool import Action, Pool, Spawn, Stop
from djsupervisor.supervisor.slot import Outcome, Slot, Then
from djsupervisor.supervisor.states import WORKING, StopIntent

#: Seconds a new child has to start its first cycle (import, connect, first scan) before the roll halts.
FIRST_CYCLE_TIMEOUT = 120.0
#: Seconds the probe has to import every target.
PROBE_TIMEOUT = 120.0
_KEPT = 8  # finished rolls kept for the command to read


class Phase(enum.Enum):
    PROBING = "probing"
    ROLLING = "rolling"
    DONE = "done"
    FAILED = "failed"


def in_a_job(slot: Slot) -> bool:
    """Whether the child of `slot` is in a job (its first one may take hours: no start deadline then)."""
    return slot.report.activity == "populating"


@dataclasses.dataclass(eq=False)
class Roll:
    """One restart of the pools `names`, in order. `changes` says what moved, `error` why it halted."""

    id: int
    names: list[str]
    started: float  # monotonic
    phase: Phase = Phase.PROBING
    changes: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    surge: Slot | None = None  # the new child of the slot being rolled, not yet in its pool
    surge_deadline: float = 0.0
    leaving: Slot | None = None  # the old child it replaced, finishing its job in flight
    leaving_done_at_swap: tuple[int, int] = (0, 0)
    queue: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (pool, index) still to roll
    pool_name: str | None = None  # the pool being rolled
    rolled: set[str] = dataclasses.field(default_factory=set)  # pools whose new code started (or had no child)
    finished: float | None = None

    @property
    def done(self) -> bool:
        return self.phase in (Phase.DONE, Phase.FAILED)

    def fail(self, reason: str, now: float) -> None:
        self.phase, self.error, self.finished = Phase.FAILED, reason, now

    def probed(self, problems: dict[str, str], now: float) -> None:
        """The probe's answer: a problem per pool (none: roll)."""
        if problems:
            listed = "; ".join(f"{name}: {problem}" for name, problem in sorted(problems.items()))
            self.fail(f"the new code does not import, nothing was restarted: {listed}", now)
            return
        self.phase = Phase.ROLLING

    def advance(self, pools: dict[str, Pool], now: float, rules: Any = None) -> list[Action]:
        """What moves the roll on at monotonic time `now`; `rules` (the supervisor's config) has the
        heartbeat and hang timeouts the new child is judged by, as its pool's children are."""
        if self.phase is not Phase.ROLLING:
            return []
        if self.surge is not None:
            return self._watch_surge(pools, now, rules)
        if self.leaving is not None and self.leaving.pid is not None:
            return []  # a surge of one: the next slot waits until the old child is gone
        self.leaving = None
        while True:
            if not self.queue:
                if self.pool_name is not None:  # its slots are done (or were down): later children start fresh
                    self.rolled.add(self.pool_name)
                    self.pool_name = None
                if not self.names:
                    self.phase, self.finished = Phase.DONE, now
                    return []
                name = self.names.pop(0)
                pool = pools.get(name)
                if pool is None or pool.config is None:
                    self.changes.append(f"{name}: removed meanwhile, not restarted")
                    continue
                self.pool_name = name
                live = [s.index for s in pool.active() if s.pid is not None and s.state in WORKING]
                self.queue = [(name, index) for index in live]
                if not live:  # probed, it imports: its next children start fresh
                    self.changes.append(f"{name}: no child running; its next children start on the new code")
                continue
            name, index = self.queue.pop(0)
            pool = pools.get(name)
            old = pool.slots.get(index) if pool is not None else None
            if pool is None or pool.config is None or old is None or old.retiring or old.pid is None:
                continue  # gone, or down meanwhile: when it starts again it starts fresh
            self.surge = Slot(name, index, pool.config)
            self.surge_deadline = now + FIRST_CYCLE_TIMEOUT
            return [Spawn(self.surge)]

    def _watch_surge(self, pools: dict[str, Pool], now: float, rules: Any) -> list[Action]:
        surge = self.surge
        assert surge is not None
        pool = pools.get(surge.worker)
        old = pool.slots.get(surge.index) if pool is not None else None
        if surge.pid is None:  # the start failed (a child's exit is `surge_exited`)
            self.fail(f"{surge.label}: the new child could not be started ({surge.last_exit or 'fork failed'})", now)
            self.surge = None
            return []
        if pool is None or old is None or old.retiring:
            self.surge = None
            return self._stop(surge, "its slot was removed during the restart")
        verdict = None
        if rules is not None:  # hung, or past job_timeout: what would get a pool's child killed
            verdict = judge(surge, now, heartbeat_timeout=rules.heartbeat_timeout, hang_timeout=rules.hang_timeout)
        if verdict is not None and verdict.action == "kill":
            reason = f"{surge.label}: the new child (pid {surge.pid}): {verdict.reason}; the old child keeps working"
            self.fail(reason, now)
            self.surge = None
            return self._stop(surge, "restart halted", fast=True)
        if in_a_job(surge):
            self.surge_deadline = max(self.surge_deadline, now + FIRST_CYCLE_TIMEOUT)
        elif now > self.surge_deadline:
            self.fail(
                f"{surge.label}: the new child (pid {surge.pid}) did not start its first cycle within"
                f" {FIRST_CYCLE_TIMEOUT:g} s; it was stopped, the old child keeps working",
                now,
            )
            self.surge = None
            return self._stop(surge, "restart halted", fast=True)
        if not surge.got_going():
            return []
        return self._swap(pool, old, surge, now)

    def _swap(self, pool: Pool, old: Slot, new: Slot, now: float) -> list[Action]:
        """The new child works: it takes the slot, the old one stops after its job in flight."""
        pool.slots[new.index] = new
        self.rolled.add(pool.name)  # the new code started once: every later child of the pool starts fresh
        new.restarts, new.spawned_once = old.restarts + 1, True
        new.jobs_done_before, new.jobs_failed_before = old.jobs_done_total, old.jobs_failed_total
        self.leaving, self.leaving_done_at_swap = old, (old.report.jobs_done, old.report.jobs_failed)
        self.surge = None
        self.changes.append(f"{new.label}: pid {old.pid} -> {new.pid} (new code, {now - new.started:.2f} s to start)")
        return self._stop(old, "restarted on new code")

    @staticmethod
    def _stop(slot: Slot, reason: str, *, fast: bool = False) -> list[Action]:
        sent = slot.stop(reason, StopIntent.RETIRE, fast=fast)
        return [Stop(slot, sent, reason)] if sent is not None else []

    def surge_exited(self, how: str, now: float) -> bool:
        """The new child ended before it took its slot: the roll halts there (True: it halted now)."""
        surge, self.surge = self.surge, None
        if surge is None or self.phase is not Phase.ROLLING:
            return False
        self.fail(
            f"{surge.label}: the new child exited ({how}) before it completed a first cycle or job; the old"
            " children keep working (the supervisor's log has the child's error)",
            now,
        )
        return True

    def left(self, slot: Slot, pools: dict[str, Pool]) -> None:
        """The old child that `slot` held is gone: count what it did after the swap in its pool's totals."""
        if slot is not self.leaving or (pool := pools.get(slot.worker)) is None:
            return
        pool.jobs_done_retired += slot.report.jobs_done - self.leaving_done_at_swap[0]
        pool.jobs_failed_retired += slot.report.jobs_failed - self.leaving_done_at_swap[1]

    def abort(self, reason: str, now: float) -> list[Action]:
        """The supervisor stops: stop the new child not yet in its slot."""
        actions = self._stop(self.surge, reason) if self.surge is not None else []
        if not self.done:
            self.fail(f"interrupted: {reason}", now)
        return actions

    def answer(self) -> dict[str, Any]:
        """What the restart command polls."""
        return {
            "roll": self.id,
            "phase": self.phase.value,
            "done": self.done,
            "changes": list(self.changes),
            "reason": self.error,  # why it halted (not "error": that key is a refused request's)
            "seconds": round((self.finished or 0.0) - self.started, 3) if self.finished else None,
        }


class Restarts:
    """The restarts of one supervisor: the roll under way (one at a time), the last finished ones, the
    probe process and which pools start their children from a fresh interpreter."""

    def __init__(self, selector: selectors.BaseSelector, fork: Callable[..., int | None], log: Any) -> None:
        self.selector = selector
        self.fork = fork
        self.log = log
        self.current: Roll | None = None
        self.rolls: dict[int, Roll] = {}
        self.fresh: set[str] = set()  # pools whose code was restarted: their children start fresh
        self.probe_pid: int | None = None
        self._probe_output = b""
        self._next_id = 1

    def start(self, names: list[str], pools: dict[str, Pool], now: float) -> Roll:
        """Begin a restart of pools `names` (the probe first); ValueError if one is under way."""
        if self.current is not None and not self.current.done:
            raise ValueError(f"a restart is under way (roll {self.current.id}): wait for it")
        roll = self.current = Roll(self._next_id, list(names), now)
        self.rolls[roll.id] = roll
        self._next_id += 1
        for old in sorted(self.rolls)[:-_KEPT]:
            del self.rolls[old]
        targets = {name: pools[name].config for name in names}
        self.log.info("restart {}: probing the new code of {}", roll.id, ", ".join(names))
        self._start_probe(targets, now)
        return roll

    def status(self) -> dict[str, Any] | None:
        """The restart under way, or the last one, for `status --json` (None before the first)."""
        return self.current.answer() if self.current is not None else None

    def is_fresh(self, slot: Slot) -> bool:
        """Whether the child of `slot` must start from a fresh interpreter."""
        roll = self.current
        return slot.worker in self.fresh or (roll is not None and slot is roll.surge)

    def owns(self, slot: Slot) -> bool:
        """Whether `slot` is a roll's new child not yet in its pool (its exit is the roll's business)."""
        return self.current is not None and slot is self.current.surge

    def advance(self, pools: dict[str, Pool], now: float, rules: Any = None) -> list[Action]:
        """Move the roll under way on (see `Roll.advance`)."""
        roll = self.current
        if roll is None or roll.done:
            return []
        self.probe_overdue(now)
        actions = roll.advance(pools, now, rules)
        self.fresh |= roll.rolled
        if roll.done:
            self._finished(roll)
        return actions

    def surge_exited(self, slot: Slot, outcome: Outcome, how: str, now: float) -> Outcome:
        """The new child of `slot` ended before taking its slot: the roll halts; what the arbiter does about
        it (nothing but log it, and recover the job it may have died in)."""
        roll = self.current
        halted = roll is not None and roll.surge_exited(how, now)
        if roll is not None and halted:
            self._finished(roll)
        message = "{} new child (restart) exited ({})" + (" before it got going: the restart halts" if halted else "")
        level = "ERROR" if halted else "INFO"
        return Outcome(Then.STAY, message, (slot.label, how), level, recover=outcome.recover or bool(slot.died_job))

    def left(self, slot: Slot, pools: dict[str, Pool]) -> None:
        """An old child is gone (see `Roll.left`)."""
        if self.current is not None:
            self.current.left(slot, pools)

    def abort(self, reason: str, now: float) -> list[Action]:
        """The supervisor stops: the roll under way halts, its new child stops."""
        roll = self.current
        if roll is None or roll.done:
            return []
        actions = roll.abort(reason, now)
        self._finished(roll)
        return actions

    def start_all(self, pools: dict[str, Pool], now: float, *, stopping: bool) -> Roll | None:
        """SIGUSR2: restart every pool (refused, with a log line, while stopping or while a restart runs)."""
        names = sorted(name for name, pool in pools.items() if pool.config is not None)
        try:
            if stopping:
                raise ValueError("the supervisor is stopping")
            return self.start(names, pools, now)
        except ValueError as error:
            self.log.warning("restart refused: {}", error)
            return None

    def _finished(self, roll: Roll) -> None:
        if roll.phase is Phase.DONE:
            self.log.info("restart {} done in {:.2f} s: {}", roll.id, roll.answer()["seconds"], "; ".join(roll.changes))
        else:
            self.log.error("restart {} halted: {}", roll.id, roll.error)

    # ----- the probe: a fresh interpreter that imports the targets, one JSON line on a pipe

    def _start_probe(self, targets: dict[str, Any], now: float) -> None:
        from djsupervisor.supervisor.fresh_child import exec_probe

        read_fd, write_fd = os.pipe()

        def body(close_fds: list[int]) -> None:
            try:
                os.dup2(write_fd, 1)
                exec_probe(targets)
            finally:
                os._exit(70)

        pid = self.fork(body)
        os.close(write_fd)
        if pid is None:
            os.close(read_fd)
            assert self.current is not None
            self.current.fail("could not start the probe (fork failed)", now)
            return
        self.probe_pid, self._probe_output = pid, b""
        os.set_blocking(read_fd, False)
        self.selector.register(read_fd, selectors.EVENT_READ, data=lambda mask: self._on_probe(read_fd))

    def _on_probe(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._probe_output += data
            return
        self.selector.unregister(fd)
        os.close(fd)
        self.probe_pid = None
        problems: dict[str, str]
        try:
            problems = json.loads(self._probe_output.decode().strip().splitlines()[-1])["problems"]
        except (ValueError, IndexError, KeyError, UnicodeDecodeError):
            problems = {"*": "the probe ended without an answer (the supervisor's log may say why)"}
        roll = self.current
        if roll is not None and roll.phase is Phase.PROBING:
            roll.probed(problems, time.monotonic())
            if roll.done:
                self._finished(roll)

    def probe_overdue(self, now: float) -> None:
        """The probe is still importing after PROBE_TIMEOUT: kill it, halt the restart."""
        roll = self.current
        if roll is None or roll.phase is not Phase.PROBING or now - roll.started < PROBE_TIMEOUT:
            return
        if self.probe_pid is not None:
            killpg(self.probe_pid, signal.SIGKILL)
        roll.fail(f"the new code did not import within {PROBE_TIMEOUT:g} s (the probe was killed)", now)
        self._finished(roll)
