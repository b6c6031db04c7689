"""Job recovery runs: short-lived children that put back to pending the jobs dead children left reserved.

A child killed or crashed in a job leaves that job reserved. Its replacement recovers it at its first
cycle (orphan recovery), so nothing is needed when a replacement comes; when none will (the slot is FATAL
or EXITED, retired, or the supervisor is stopping) the parent forks one of these for the definitions
concerned. The parent itself does no database work, hence a child; it gets `TIMEOUT` seconds.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from functools import partial

from loguru import logger

from djsupervisor.supervisor.child import run_recovery
from djsupervisor.supervisor.config import WorkerConfig
from djsupervisor.supervisor.fork import describe_exit, killpg
from djsupervisor.supervisor.slot import Slot
from djsupervisor.supervisor.timers import Timers

#: Seconds a recovery child may take before its process group is killed.
TIMEOUT = 30.0


class RecoveryRuns:
    """The definitions that need a recovery run (`due`) and the recovery children running (`pids`)."""

    def __init__(self, supervisor: str, parent_pid: int, timers: Timers) -> None:
        self.supervisor, self.parent_pid, self.timers = supervisor, parent_pid, timers
        self.due: dict[str, WorkerConfig] = {}
        self.died_jobs: list[tuple[str, dict]] = []  # (definition, job a child died in) to settle
        self.pids: set[int] = set()

    @property
    def log(self):
        return logger.bind(supervisor=self.supervisor, worker="-", slot="-")

    def need(self, slot: Slot) -> None:
        """The child of `slot` died and may have left jobs reserved that no replacement will recover (and
        the job it died in, which the recovery run settles; the slot's next child, if any, will not)."""
        self.due[slot.config.name] = slot.config
        if slot.died_job is not None:
            self.died_jobs.append((slot.config.name, slot.died_job))
            slot.died_job = None

    def start(self, fork: Callable[[Callable[[list[int]], None]], int | None]) -> None:
        """Fork (with `fork`, the arbiter's) one recovery child for every definition that needs one."""
        if not self.due:
            return
        configs, self.due = list(self.due.values()), {}
        died_jobs, self.died_jobs = self.died_jobs, []
        pid = fork(partial(self._run, configs, died_jobs))
        if pid is None:
            return
        self.pids.add(pid)
        self.log.info("job recovery for {} (pid {})", ", ".join(c.name for c in configs), pid)
        self.timers.call_at(time.monotonic() + TIMEOUT, partial(self._time_out, pid))

    def _time_out(self, pid: int) -> None:
        if pid in self.pids:
            killpg(pid, signal.SIGKILL)

    def _run(self, worker_configs: list[WorkerConfig], died_jobs: list[tuple[str, dict]], close_fds: list[int]) -> None:
        run_recovery(
            supervisor=self.supervisor,
            worker_configs=worker_configs,
            died_jobs=died_jobs,
            parent_pid=self.parent_pid,
            close_fds=close_fds,
        )

    def reaped(self, pid: int, status: int) -> bool:
        """Whether reaped child `pid` (wait status `status`) was a recovery run (then logged)."""
        if pid not in self.pids:
            return False
        self.pids.discard(pid)
        self.log.info("job recovery (pid {}) ended: {}", pid, describe_exit(os.waitstatus_to_exitcode(status)))
        return True
