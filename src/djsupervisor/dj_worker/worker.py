"""DataJointWorker as datajoint-utilities spells it, running djsupervisor's loop.

A lab's worker module was written against ``datajoint_utilities.dj_worker.DataJointWorker``: its constructor's
arguments, ``add_step(callable, position_)``, ``_run_once()`` returning a count, and a runner that assigns
``worker._run_duration`` and ``worker._sleep_duration`` from the command line before ``run()``. This subclass
accepts all of that and hands it to djsupervisor's `DataJointWorker`, so the same object also runs as a
``djsupervisor start`` target (its ``configure`` copies stay of this class: `configure` builds ``type(self)``).

Where djsupervisor's semantics differ on purpose (orphaned reservations re-pended at once, stale ones
re-pended rather than marked as errors, ErrorLog rows kept as history), this class keeps djsupervisor's;
MIGRATING.md lists the differences. An argument whose meaning would silently change is warned about once
(`UpstreamSemanticsWarning`). ``notifiers`` and per-step ``notify_on`` work as upstream's (`djsupervisor.notify`);
they never reach populate().
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import datajoint as dj

from djsupervisor.dj_worker import worker_schema
from djsupervisor.dj_worker.worker_schema import check_number
from djsupervisor.worker import loop
from djsupervisor.worker.events import CycleSummary
from djsupervisor.worker.steps import TableStep, make_step

__all__ = ["DataJointWorker", "UpstreamSemanticsWarning"]


class UpstreamSemanticsWarning(UserWarning):
    """An argument datajoint-utilities gave another meaning than djsupervisor does (warned once)."""


_warned: set[str] = set()
# True while `configure` builds its copy: the settings are djsupervisor's already, not a lab's to translate.
_as_configured = contextvars.ContextVar("djsupervisor_dj_worker_as_configured", default=False)


def warn_once(message: str, stacklevel: int) -> None:
    """Warn `message` (an `UpstreamSemanticsWarning`) the first time in this process; `stacklevel` counts
    from the caller of `warn_once` (2: that caller's caller, the lab's line)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, UpstreamSemanticsWarning, stacklevel=stacklevel + 1)


def _prefixes(db_prefix: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """datajoint-utilities' db_prefix (a string, a list, ``[""]`` for none) as djsupervisor's."""
    if isinstance(db_prefix, str):
        db_prefix = [db_prefix]
    kept = tuple(p for p in db_prefix or () if p)
    return kept or None


class DataJointWorker(loop.DataJointWorker):
    """datajoint-utilities' DataJointWorker: its arguments and attributes, djsupervisor's loop.

    Parameters
    ----------
    worker_name, worker_schema_name : str
        As for djsupervisor's `DataJointWorker`.
    run_duration : float
        Seconds after which no new cycle starts; negative or None: no limit. (0 runs no cycle in
        datajoint-utilities; here it means no limit, warned.)
    sleep_duration : float
        Seconds between cycles.
    max_idled_cycle : int
        Stop after more than this many consecutive idle cycles; <= 0: never.
    autoclear_error_patterns : list of str
        SQL LIKE patterns of error messages to re-pend, besides the built-in transient ones.
    db_prefix : str or list of str
        The lab's schema prefixes; ``[""]`` (datajoint-utilities' default) means none.
    stale_timeout_hours : float
        Age after which a reservation whose connection is gone is re-pended. <= 0 turned stale handling off
        in datajoint-utilities; djsupervisor always does it (only for reservations whose connection is
        gone), so <= 0 keeps 24 h, warned.
    remove_stale_reserved_jobs : bool, optional
        Deprecated (DeprecationWarning); False means ``stale_timeout_hours=0``, as in datajoint-utilities.
    notifiers : list, optional
        Objects with a ``notify`` method, kept in `notifiers` for djsupervisor's notifications.
    max_sleep_duration, recovery_scope, refresh_interval, max_attempts, retry_delay, log_retention_days, connection
        djsupervisor's own settings (see `djsupervisor.worker.loop.DataJointWorker`).
    """

    def __init__(
        self,
        worker_name: str,
        worker_schema_name: str,
        *,
        run_duration: float | None = -1,
        sleep_duration: float = 60,
        max_idled_cycle: int = -1,
        autoclear_error_patterns: Iterable[str] = (),
        db_prefix: str | Sequence[str] | None = ("",),
        stale_timeout_hours: float = 24,
        remove_stale_reserved_jobs: bool | None = None,
        notifiers: Iterable[Any] | None = None,
        max_sleep_duration: float | None = None,
        recovery_scope: str = "own",
        refresh_interval: float | None = None,
        max_attempts: int = 3,
        retry_delay: float = 10,
        log_retention_days: float = 30,
        connection: dj.Connection | None = None,
    ) -> None:
        if remove_stale_reserved_jobs is not None:
            warnings.warn(
                "remove_stale_reserved_jobs is deprecated: use stale_timeout_hours", DeprecationWarning, stacklevel=2
            )
            if not remove_stale_reserved_jobs:
                stale_timeout_hours = 0
        if not _as_configured.get():
            run_duration = self._translated_run_duration(run_duration)
            if check_number("stale_timeout_hours", stale_timeout_hours) <= 0:
                warn_once(
                    "stale_timeout_hours <= 0 (or remove_stale_reserved_jobs=False) turned stale-job handling off in "
                    "datajoint-utilities; djsupervisor re-pends a reservation only once its connection is gone, "
                    "and keeps 24 hours",
                    stacklevel=2,
                )
                stale_timeout_hours = 24
        super().__init__(
            worker_name,
            worker_schema_name,
            run_duration=-1 if run_duration is None else run_duration,
            sleep_duration=sleep_duration,
            max_idled_cycle=max_idled_cycle,
            stale_timeout_hours=stale_timeout_hours,
            autoclear_error_patterns=autoclear_error_patterns,
            db_prefix=_prefixes(db_prefix),
            max_sleep_duration=max_sleep_duration,
            recovery_scope=recovery_scope,
            refresh_interval=refresh_interval,
            max_attempts=max_attempts,
            retry_delay=retry_delay,
            log_retention_days=log_retention_days,
            connection=connection,
            notifiers=list(notifiers or ()),
        )
        worker_schema.context.created = self

    @staticmethod
    def _translated_run_duration(value: Any) -> Any:
        if value == 0 and not isinstance(value, bool):
            warn_once("run_duration=0 ran no cycle in datajoint-utilities; djsupervisor treats it as no limit", 3)
        return value

    # ----- registration

    def __call__(self, process: Any, *, notify_on: Sequence[str] | None = None, **kwargs: Any) -> DataJointWorker:
        """Register a table or callable (`add_step` at the end); returns the worker."""
        self.add_step(process, notify_on=notify_on, **kwargs)
        return self

    def add_step(
        self, callable: Any, position_: int | None = None, *, notify_on: Sequence[str] | None = None, **kwargs: Any
    ) -> None:
        """Register `callable` (an auto-populated table or a callable) at `position_` in the running order (at
        the end by default); `kwargs` go to populate() or the call, `notify_on` to the step."""
        step = make_step(callable, dict(kwargs, notify_on=notify_on))
        self._steps.insert(len(self._steps) if position_ is None else position_, step)

    def configure(self, **overrides: Any) -> DataJointWorker:
        """A copy of this worker (of this class) with some settings overridden, as a supervisor runs it."""
        token = _as_configured.set(True)
        try:
            worker = super().configure(**overrides)
        finally:
            _as_configured.reset(token)
        assert isinstance(worker, DataJointWorker)
        return worker

    # ----- datajoint-utilities' attributes

    @property
    def _run_duration(self) -> float:
        return self.run_duration

    @_run_duration.setter
    def _run_duration(self, value: float | None) -> None:
        if value is not None:  # parse_args' default when -d was not given: the worker's own value stands
            self.run_duration = check_number("run_duration", self._translated_run_duration(value))

    @property
    def _sleep_duration(self) -> float:
        return self.sleep_duration

    @_sleep_duration.setter
    def _sleep_duration(self, value: float | None) -> None:
        if value is None:  # parse_args' default when -s was not given
            return
        if check_number("sleep_duration", value) < 0:
            raise ValueError(f"sleep_duration must be >= 0, got {value!r}")
        self.sleep_duration = value

    @property
    def _max_idled_cycle(self) -> float:
        return self.max_idled_cycle

    @_max_idled_cycle.setter
    def _max_idled_cycle(self, value: int) -> None:
        self.max_idled_cycle = check_number("max_idled_cycle", value)

    @property
    def _stale_timeout_hours(self) -> float:
        return self.stale_timeout_hours

    @property
    def _autoclear_error_patterns(self) -> list[str]:
        return list(self.autoclear_error_patterns)

    @property
    def _db_prefix(self) -> list[str]:
        return list(self.db_prefix or [""])

    @property
    def _processes_to_run(self) -> list[tuple[str, Any, dict]]:
        """(``"dj_table"`` or ``"function"``, the table or callable, its keyword arguments), in running order."""
        return [
            ("dj_table", step.table, step.populate_kwargs)
            if isinstance(step, TableStep)
            else ("function", step.func, step.kwargs)
            for step in self._steps
        ]

    # ----- the loop

    def process_identity(self) -> dict:
        """This process's identity in the worker tables (worker name, host, pid, process start)."""
        return self._record.identity()

    @contextlib.contextmanager
    def _speaking_for_the_tables(self) -> Iterator[None]:
        """The module-level worker tables log under this worker while it runs a cycle."""
        previous, worker_schema.context.running = worker_schema.context.running, self
        try:
            yield
        finally:
            worker_schema.context.running = previous

    def run_once(self) -> CycleSummary:
        """One cycle (see djsupervisor's `DataJointWorker.run_once`)."""
        with self._speaking_for_the_tables():
            return super().run_once()

    def _run_once(self) -> int:
        """One cycle; returns datajoint-utilities' count: the jobs its tables completed or failed."""
        summary = self.run_once()
        return sum(c.done + c.failed for c in summary.processes.values() if c.kind == "table")
