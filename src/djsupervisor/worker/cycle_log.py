"""WorkerLog rows: one per busy cycle, one per idle stretch.

A row per cycle made an idle worker the biggest writer of its own database: 86,400 WorkerLog rows per worker
and day at a 1 s sleep, for nothing but "still idle". Now consecutive idle cycles share their rows (one per
registered process, as a busy cycle's): the first idle cycle inserts them (``idle_cycles = 1``), later ones
count in memory and write their totals into those rows in place (``idle_cycles``, ``last_time``, durations,
recovery counts) at most every `FLUSH_SECONDS`. A stretch is closed, and the next idle cycle opens a new one,
when a cycle does work, when it is `STRETCH_SECONDS` old, when the process changes (a fork) or when its
processes do. A week of 1 s idle cycles of a one-table worker is thus 168 rows, not 604,800; and 10,080
UPDATE statements, not 604,800.

Time is the cycles' own start time (`CycleSummary.started`), never a clock read here, so that a test can
drive a week of cycles in seconds. What a stretch has not yet written when its process dies (at most
`FLUSH_SECONDS` of idle cycles) is lost: an idle count, never a job.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from djsupervisor.worker.events import CycleSummary

STRETCH_SECONDS = 3600.0  # an idle stretch's rows stand for at most an hour: 24 per process and day
FLUSH_SECONDS = 60.0  # an open stretch's rows are at most a minute behind its last cycle


@dataclasses.dataclass
class IdleStretch:
    """Consecutive idle cycles of one process, written as one WorkerLog row per registered process."""

    pid: int
    log_ids: dict[str, str]  # process name -> its row's log_id
    first_started: float  # the first cycle's start (epoch seconds)
    last_started: float
    cycles: int = 1
    durations: dict[str, float] = dataclasses.field(default_factory=dict)
    recovered: int = 0
    cleared: int = 0
    written_at: float = 0.0  # `last_started` when the totals were last written
    dirty: bool = False  # totals not yet written

    def add(self, summary: CycleSummary, durations: dict[str, float]) -> None:
        """Count one more idle cycle in."""
        self.cycles += 1
        self.last_started = summary.started
        for process, seconds in durations.items():
            self.durations[process[:255]] = self.durations.get(process[:255], 0.0) + seconds
        self.recovered += summary.recovered_stale + summary.recovered_orphaned
        self.cleared += summary.cleared_errors
        self.dirty = True


class CycleLog:
    """Writes a worker process's cycles to WorkerLog, folding idle cycles into stretches.

    Parameters
    ----------
    schema : callable
        Returns the `WorkerSchema` to write to (looked up at each write: it changes after a fork).
    """

    def __init__(self, schema: Any) -> None:
        self._schema = schema
        self.stretch: IdleStretch | None = None

    def log(self, identity: dict, summary: CycleSummary, durations: dict[str, float]) -> None:
        """Write the cycle `summary` describes (or count it into the open idle stretch)."""
        stretch = self.stretch
        if not summary.idle or summary.reservations_lost:  # a cycle that raced for jobs gets its own rows
            self.close()
            self._schema().log_cycle(identity, summary, durations)
            return
        if (
            stretch is not None
            and stretch.pid == os.getpid()
            and stretch.log_ids.keys() == {p[:255] for p in summary.processes}
            and summary.started - stretch.first_started < STRETCH_SECONDS
        ):
            stretch.add(summary, durations)
            if summary.started - stretch.written_at >= FLUSH_SECONDS:
                self.flush()
            return
        self.close()
        log_ids = self._schema().log_cycle(identity, summary, durations, idle=True)
        if log_ids:
            self.stretch = IdleStretch(
                pid=os.getpid(),
                log_ids=log_ids,
                first_started=summary.started,
                last_started=summary.started,
                durations={p[:255]: d for p, d in durations.items()},
                recovered=summary.recovered_stale + summary.recovered_orphaned,
                cleared=summary.cleared_errors,
                written_at=summary.started,
            )

    def flush(self) -> None:
        """Write the open stretch's totals, if any are unwritten (a failure leaves them to the next flush)."""
        stretch = self.stretch
        if stretch is None or not stretch.dirty or stretch.pid != os.getpid():
            return
        found = self._schema().update_idle_stretch(stretch)
        stretch.dirty = False
        stretch.written_at = stretch.last_started
        if not found:  # its rows were deleted: the next idle cycle opens a new stretch
            self.stretch = None

    def close(self) -> None:
        """Write the open stretch's totals and close it: the next idle cycle opens a new one."""
        try:
            self.flush()
        finally:
            self.stretch = None
