"""What a worker reports: its current activity, the events of its loop, and the summary of a cycle."""

from __future__ import annotations

import dataclasses
from typing import Literal

State = Literal["idle", "running", "populating", "sleeping", "stopped"]


@dataclasses.dataclass(frozen=True)
class Activity:
    """What a worker is doing right now.

    `state` is ``idle`` before the first cycle, ``running`` between steps of a cycle (cleanup, logging),
    ``populating`` while a table or callable runs (`table` names it, `key` is the job's key where known),
    ``sleeping`` between cycles and ``stopped`` once `run()` has returned.
    """

    state: State
    table: str | None = None
    key: dict | None = None


@dataclasses.dataclass
class ProcessCounts:
    """What one registered process did in one cycle.

    For a table: `done` jobs completed, `failed` jobs whose make() raised (recorded as job errors).
    For a callable: `done` is the work it reported (see `CycleSummary.idle`), `failed` stays 0.
    `errors` counts the step itself raising: a callable's exception, or populate failing outside make().
    `lost` counts a table's reservations the database refused because another worker reserved the job first
    (each a wasted round trip; see `djsupervisor.worker.pending_order`).
    """

    kind: Literal["table", "callable"]
    done: int = 0
    failed: int = 0
    errors: int = 0
    lost: int = 0


@dataclasses.dataclass
class CycleSummary:
    """What one cycle did.

    `processes` maps each registered process (a table's full name, or a callable's qualified name) to its
    `ProcessCounts`. `recovered_stale`, `recovered_orphaned` and `cleared_errors`
    count jobs returned to pending by the cleanup step. A cycle is idle when no process completed or
    failed anything: see `idle`.
    """

    cycle: int
    started: float
    duration: float = 0.0
    processes: dict[str, ProcessCounts] = dataclasses.field(default_factory=dict)
    recovered_stale: int = 0
    recovered_orphaned: int = 0
    cleared_errors: int = 0
    stopped_early: bool = False

    @property
    def jobs_done(self) -> int:
        """Jobs completed (and callables that reported work) in this cycle."""
        return sum(c.done for c in self.processes.values())

    @property
    def jobs_failed(self) -> int:
        """Jobs that failed, plus processes that raised, in this cycle."""
        return sum(c.failed + c.errors for c in self.processes.values())

    @property
    def reservations_lost(self) -> int:
        """Reservations lost to other workers in this cycle."""
        return sum(c.lost for c in self.processes.values())

    @property
    def idle(self) -> bool:
        """True when no table completed or failed a job and no callable reported work.

        A callable reports work by returning a truthy value or a positive number. A callable that raised,
        or a populate that failed outside make() (the database is unreachable, say), does not make a cycle
        busy; nor does recovery, which only puts jobs back in a queue for the next cycle to work.
        """
        return all(c.done == 0 and c.failed == 0 for c in self.processes.values())

    def as_dict(self) -> dict:
        """A JSON-ready form."""
        data = dataclasses.asdict(self)
        data.update(
            jobs_done=self.jobs_done,
            jobs_failed=self.jobs_failed,
            reservations_lost=self.reservations_lost,
            idle=self.idle,
        )
        return data


EventKind = Literal[
    "cycle_start",
    "job_start",
    "job_end",
    "callable_start",
    "callable_end",
    "step_failed",
    "sleep",
    "cycle_end",
    "stopped",
]


@dataclasses.dataclass(frozen=True)
class WorkerEvent:
    """One step of the worker loop, as given to listeners added with `DataJointWorker.add_listener`.

    ``step_failed``: a step raised outside a job (a callable, or populate's own machinery); `message` is
    the error, as it is on the ``job_end`` of a failed job.
    """

    kind: EventKind
    table: str | None = None
    key: dict | None = None
    ok: bool | None = None
    summary: CycleSummary | None = None
    seconds: float | None = None
    message: str | None = None
