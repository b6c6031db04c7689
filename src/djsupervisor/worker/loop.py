"""DataJointWorker: the bounded cycle loop that works a DataJoint pipeline in one process.

Each cycle:

1. recovers jobs: stale and orphaned reservations go back to pending, transient errors are cleared
   (see `djsupervisor.worker.recovery`). This runs first, so a worker that replaces a crashed one re-pends and
   then works its predecessor's jobs in the same cycle;
2. runs every registered process in registration order: tables with
   ``populate(reserve_jobs=True, suppress_errors=True, **kwargs)``, callables with ``func(**kwargs)``;
   a failing ``make()`` or callable is logged and recorded in ErrorLog, and the loop goes on;
3. logs the cycle (WorkerLog) and heartbeats (RegisteredWorker);
4. checks the stop conditions, then sleeps; after a cycle that could not reach the database server, at
   least an outage backoff of 1 s doubling up to 30 s (`djsupervisor.worker.outage`).

A cycle is **idle** when no table completed or failed a job and no callable reported work. A
callable reports work by returning a truthy value or a positive number (``0``, negatives, ``None``,
``False`` and empty containers report none). Re-pending jobs in step 1 is not work.

The loop stops after a complete cycle when `run_duration` > 0 and more than `run_duration` seconds have
passed since `run()` started, when `max_idled_cycle` > 0 and more than `max_idled_cycle` consecutive
cycles were idle, or when `stop()` was called (or SIGTERM arrived, see `run()`); then the cycle in
progress finishes its job in flight, starts no new job, and still logs. No new cycle begins once
`run_duration` has passed, even mid-sleep.

`DataJointWorker` holds the settings, the registered steps and the loop; the rest is delegated, one
concern per module, so that none of them needs the worker's private state: `stop` (how a stop and SIGTERM
reach the loop), `progress` (the activity and counters the steps report to, their `StepHost`), `record`
(the worker's rows), `outage` (backoff and reconnects), `recovery` (the job queues).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import datajoint as dj
from loguru import logger

from djsupervisor.notify.notifiers import check_notifiers
from djsupervisor.worker import compat, identifiers
from djsupervisor.worker.attempts import attempt_book
from djsupervisor.worker.connection import (
    distinct_connections,
    drop_password_variable,
    keep_connection_id_current,
    note_server,
    refresh_connection_id,
)
from djsupervisor.worker.events import Activity, CycleSummary, WorkerEvent
from djsupervisor.worker.notifications import StepNotifications
from djsupervisor.worker.outage import OutageTracker
from djsupervisor.worker.progress import Progress
from djsupervisor.worker.record import WorkerRecord
from djsupervisor.worker.recovery import JobRecovery
from djsupervisor.worker.schema import WorkerSchema
from djsupervisor.worker.settings import RECOVERY_SCOPES, WORKER_SETTING_NAMES
from djsupervisor.worker.steps import CallableStep, TableStep, make_step
from djsupervisor.worker.stop import StopSignal
from djsupervisor.worker.upstream_schema import UpstreamWorkerSchema


def _number(name: str, value: Any, minimum: float | None = None, *, integer: bool = False, above: bool = False) -> Any:
    """`value` if it is a number (an integer if `integer`) of at least `minimum` (more if `above`); otherwise
    ValueError naming setting `name`."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if minimum is not None and (value < minimum or (above and value == minimum)):
        raise ValueError(f"{name} must be {'>' if above else '>='} {minimum:g}, got {value!r}")
    return value


class DataJointWorker:
    """A worker that runs registered tables and callables in a bounded cycle loop.

    Parameters
    ----------
    worker_name : str
        Name of this worker definition (in logs, process titles and the worker tables).
    worker_schema_name : str
        Schema for RegisteredWorker, WorkerLog and ErrorLog (declared on first use).
    run_duration : float
        Seconds after which no new cycle starts; <= 0 runs forever.
    sleep_duration : float
        Seconds to sleep between cycles.
    max_idled_cycle : int
        Stop after more than this many consecutive idle cycles; <= 0 never stops for idleness.
    stale_timeout_hours : float
        Age after which a reservation whose connection is gone goes back to pending.
    autoclear_error_patterns : iterable of str
        SQL LIKE patterns (case-insensitive) of error messages to re-pend, besides the built-in
        transient ones (`djsupervisor.worker.recovery.TRANSIENT_ERROR_PATTERNS`).
    db_prefix : str or sequence of str, optional
        The prefixes of the lab's schemas. Job recovery reaches into them only with
        ``recovery_scope="db_prefix"``.
    recovery_scope : {"own", "db_prefix"}
        Which job tables recovery and error clearing touch: ``"own"`` (the default) only the queues of the
        tables this worker populates; ``"db_prefix"`` also every job table in the schemas starting with
        `db_prefix` (whoever populates them). Never the whole server.
    max_sleep_duration : float, optional
        Adaptive sleep: the wait doubles after each idle cycle up to this, and drops back to
        `sleep_duration` as soon as a cycle does work. None keeps the sleep fixed.
    refresh_interval : float, optional
        Seconds between two refreshes of a table's job queue by any worker of the fleet (one refresh per
        table and interval, see `djsupervisor.worker.refresh_lease`); None: `sleep_duration`; 0: every cycle.
    max_attempts : int
        Failed attempts at a job (its process died, it timed out, a transient error was cleared) after which
        it becomes an error that nothing re-pends (see `djsupervisor.worker.attempts`).
    retry_delay : float
        Seconds a failed job waits before its next attempt, doubling with each attempt, at most an hour.
    log_retention_days : float
        WorkerLog and ErrorLog rows older than this, and RegisteredWorker rows of processes gone this long,
        are pruned (by the fleet agent of a supervised worker; by a worker run by hand, hourly; see
        `djsupervisor.worker.retention`).
    connection : datajoint.Connection, optional
        Connection for the worker tables and job recovery (DataJoint's global one by default).
    notifiers : list, optional
        Objects with ``notify(title, message, **kwargs)`` (datajoint-utilities' interface, or the built-in
        `djsupervisor.notify.SlackWebhookNotifier` and `JsonWebhookNotifier`): told of the jobs whose step
        names their status in ``notify_on``, and, under a supervisor, of its events about this worker's pool
        (see `djsupervisor.worker.notifications`). Sent from a background thread, rate limited.

    Use as a decorator on a function, or call it on tables and callables::

        worker = DataJointWorker("standard", "lab_workers", sleep_duration=30)
        worker(Session)                    # an auto-populated table class or instance
        worker(Analysis, max_calls=10)     # kwargs go to populate()
        worker(notify, channel="#lab")     # a callable, called as notify(channel="#lab")
        worker(Ingest, notify_on=["error"])  # tell the worker's notifiers of Ingest's failed jobs
        worker.run()
    """

    SETTINGS = WORKER_SETTING_NAMES  # declared in djsupervisor.worker.settings
    RECOVERY_SCOPES = RECOVERY_SCOPES

    def __init__(
        self,
        worker_name: str,
        worker_schema_name: str,
        *,
        run_duration: float = -1,
        sleep_duration: float = 60,
        max_idled_cycle: int = -1,
        stale_timeout_hours: float = 24,
        autoclear_error_patterns: Iterable[str] = (),
        db_prefix: str | Sequence[str] | None = None,
        max_sleep_duration: float | None = None,
        recovery_scope: str = "own",
        refresh_interval: float | None = None,
        max_attempts: int = 3,
        retry_delay: float = 10,
        log_retention_days: float = 30,
        connection: dj.Connection | None = None,
        notifiers: Sequence[Any] | None = None,
    ) -> None:
        if not isinstance(worker_name, str) or not worker_name:
            raise ValueError(f"worker_name must be a non-empty string, got {worker_name!r}")
        if not isinstance(worker_schema_name, str) or not identifiers.is_schema_name(worker_schema_name):
            raise ValueError(
                "worker_schema_name must be a schema name of letters, digits, '_', '-' or '$', "
                f"got {worker_schema_name!r}"
            )
        self.name = worker_name
        self.worker_schema_name = worker_schema_name
        self.run_duration = _number("run_duration", run_duration)
        self.sleep_duration = _number("sleep_duration", sleep_duration, 0)
        self.max_idled_cycle = _number("max_idled_cycle", max_idled_cycle)
        self.stale_timeout_hours = _number("stale_timeout_hours", stale_timeout_hours, 0)
        if isinstance(autoclear_error_patterns, str):
            autoclear_error_patterns = [autoclear_error_patterns]
        self.autoclear_error_patterns = tuple(autoclear_error_patterns)
        if isinstance(db_prefix, str):
            db_prefix = [db_prefix]
        self.db_prefix = tuple(db_prefix) if db_prefix else None
        if recovery_scope not in self.RECOVERY_SCOPES:
            raise ValueError(f"recovery_scope must be one of {', '.join(self.RECOVERY_SCOPES)}, got {recovery_scope!r}")
        if recovery_scope == "db_prefix" and not self.db_prefix:
            raise ValueError("recovery_scope 'db_prefix' needs a db_prefix (recovery is never server-wide)")
        self.recovery_scope = recovery_scope
        self.log_retention_days = _number("log_retention_days", log_retention_days, 0, above=True)
        self.max_attempts = _number("max_attempts", max_attempts, 1, integer=True)
        self.retry_delay = _number("retry_delay", retry_delay, 0)
        no_interval = refresh_interval is None  # the sleep_duration
        self.refresh_interval = None if no_interval else _number("refresh_interval", refresh_interval, 0)
        if max_sleep_duration is not None:
            _number("max_sleep_duration", max_sleep_duration)
            if max_sleep_duration < self.sleep_duration:
                raise ValueError(
                    f"max_sleep_duration ({max_sleep_duration!r}) must be >= sleep_duration ({sleep_duration!r})"
                )
        self.max_sleep_duration = max_sleep_duration
        self.notifiers = check_notifiers(notifiers)
        self._connection = connection
        self._steps: list[TableStep | CallableStep] = []
        self._listeners: list[Callable[[WorkerEvent], None]] = []
        self._outage = OutageTracker(worker_name)
        self._stop_signal = StopSignal()
        self._record = WorkerRecord(
            worker_name,
            worker_schema_name,
            connection=lambda: self.connection,
            settings=lambda: dict(self.settings, processes=[s.describe() for s in self._steps]),
            outage=self._outage,
        )
        self._progress = Progress(
            worker_name,
            record=self._record,
            stop_signal=self._stop_signal,
            listeners=lambda: self._listeners,
            refresh_interval=lambda: self.sleep_duration if self.refresh_interval is None else self.refresh_interval,
        )
        self._recovery: JobRecovery | None = None
        self._recovery_identity: dict | None = None  # the process identity `_recovery` was made for

    # ----- registration

    def __call__(self, process: Any, **kwargs: Any) -> DataJointWorker:
        """Register a table (class or instance) or a callable; returns the worker (so it decorates).

        A table of another tier than Imported or Computed is refused (TypeError), and so are
        ``reserve_jobs=False`` and ``suppress_errors=False`` (ValueError); ``notify_on=[...]`` is kept on the
        step (its `notify_on`), never passed on."""
        self._steps.append(make_step(process, kwargs))
        return self

    @property
    def processes(self) -> list[str]:
        """Names of the registered processes, in the order they run."""
        return [step.name for step in self._steps]

    @property
    def tables(self) -> list[Any]:
        """The auto-populated tables registered, in the order they run (callables left out)."""
        return [step.table for step in self._steps if isinstance(step, TableStep)]

    @property
    def job_tables(self) -> list[tuple[str, str]]:
        """(schema, job table) of every registered table's queue: what job recovery touches by default."""
        return [step.job_table_key for step in self._steps if isinstance(step, TableStep)]

    @property
    def settings(self) -> dict:
        """The overridable settings (those `configure` accepts)."""
        return {name: getattr(self, name) for name in self.SETTINGS}

    def configure(self, **overrides: Any) -> DataJointWorker:
        """A copy of this worker with the same processes and some settings overridden."""
        unknown = sorted(set(overrides) - set(self.SETTINGS))
        if unknown:
            raise TypeError(f"unknown worker setting {unknown[0]!r}; known: {', '.join(self.SETTINGS)}")
        worker = type(self)(  # a subclass (djsupervisor.dj_worker's) copies as itself
            self.name,
            self.worker_schema_name,
            **{**self.settings, **overrides},
            connection=self._connection,
            notifiers=self.notifiers,
        )
        worker._steps = list(self._steps)
        worker._listeners = list(self._listeners)
        return worker

    def add_listener(self, listener: Callable[[WorkerEvent], None]) -> None:
        """Call `listener(event)` on every step of the loop, synchronously, in the worker's thread."""
        self._listeners.append(listener)

    # ----- state

    @property
    def activity(self) -> Activity:
        """What the worker is doing now: idle, running, populating (which table, which key), sleeping, stopped."""
        return self._progress.activity

    @property
    def cycles(self) -> int:
        """Cycles started since the worker was made."""
        return self._progress.cycles

    @property
    def jobs_done(self) -> int:
        """Jobs completed (and work reported by callables) since the worker was made."""
        return self._progress.jobs_done

    @property
    def jobs_failed(self) -> int:
        """Jobs failed, and steps that raised, since the worker was made."""
        return self._progress.jobs_failed

    @property
    def connection(self) -> dj.Connection:
        """The connection for the worker tables and job recovery."""
        if self._connection is None:
            self._connection = dj.conn()
        return self._connection

    def held_connections(self) -> list[dj.Connection]:
        """Every distinct connection open now, opening none: DataJoint's global one, the worker's own and its
        tables' (what a forked child must reconnect, and what an outage may have cut)."""
        tables = [step.table.connection for step in self._steps if isinstance(step, TableStep)]
        return distinct_connections(compat.global_connection(), self._connection, *tables)

    @property
    def stop_requested(self) -> bool:
        """True once `stop()` was called or (while SIGTERM is blocked in this thread) SIGTERM arrived."""
        return self._stop_signal.requested

    def stop(self, reason: str = "") -> None:
        """Ask the loop to stop at the next job boundary; safe from other threads and signal handlers.

        The job in flight finishes, no new job starts, the cycle's logging still happens, and `run()`
        returns without sleeping.
        """
        self._stop_signal.request(reason)

    # ----- bookkeeping (never allowed to end the loop; see `djsupervisor.worker.record`)

    def place(self, *, supervisor: str, slot: int, host: str | None = None, heartbeat_window: float = 0.0) -> None:
        """Record where this worker runs, for the fleet registry (djsupervisor's children call this).

        `host` replaces the machine's host name in RegisteredWorker, WorkerLog and ErrorLog (a pod's or
        a Slurm node's name, say). `heartbeat_window`: seconds within which the supervisor's fleet agent
        stamps this process's row again; it owns the window from then on."""
        self._record.place(supervisor=supervisor, slot=slot, host=host, heartbeat_window=heartbeat_window)

    @property
    def schema(self) -> WorkerSchema:
        """The worker tables (declared on first use)."""
        return self._record.schema

    def _recover(self, summary: CycleSummary) -> None:
        identity = self._record.identity()
        if self._recovery is None or self._recovery_identity is not identity:  # first cycle, or forked since
            self._recovery_identity = identity
            self._recovery = JobRecovery(
                self.connection,
                tables=self.job_tables,
                stale_timeout_hours=self.stale_timeout_hours,
                db_prefix=self.db_prefix if self.recovery_scope == "db_prefix" else None,
                autoclear_error_patterns=self.autoclear_error_patterns,
                on_cleared_error=functools.partial(self._record.log_error, "cleared"),
                attempts=attempt_book(self),
            )
        own = [step.job_table_id for step in self._steps if isinstance(step, TableStep) and step.job_table_id]
        counts = self._record.attempt("job recovery", functools.partial(self._recovery.run, own))
        if counts is not None:
            summary.recovered_stale, summary.recovered_orphaned = counts.stale, counts.orphaned
            summary.cleared_errors = counts.cleared

    # ----- the loop

    def run_once(self) -> CycleSummary:
        """Run one cycle (recovery, every process, logging) and return what it did."""
        progress = self._progress
        progress.cycles += 1
        self._outage.start_cycle()
        summary = CycleSummary(cycle=progress.cycles, started=time.time())
        started = time.monotonic()
        progress.set_activity("running")
        progress.emit(WorkerEvent("cycle_start"))
        self._outage.reconnect_lost(self.held_connections(), self._record.attempt)
        progress.heartbeat()
        self._recover(summary)
        durations: dict[str, float] = {}
        for step in self._steps:
            if self.stop_requested:
                summary.stopped_early = True
                break
            step_started = time.monotonic()
            summary.processes[step.name] = step.run(progress)
            durations[step.name] = time.monotonic() - step_started
            progress.set_activity("running")
        summary.duration = time.monotonic() - started
        self._record.log_cycle(summary, durations)
        progress.heartbeat()
        self._outage.end_cycle()
        progress.emit(WorkerEvent("cycle_end", summary=summary))
        return summary

    def run(self) -> None:
        """Run cycles until a stop condition holds (see the module docstring), then return.

        SIGTERM asks for a graceful stop, like `stop()`: the job in flight finishes and no new one starts.
        A worker schema made by datajoint-utilities stops it at once: `UpstreamWorkerSchema`, logged as one
        line and raised.
        How SIGTERM reaches the loop (blocked in a supervisor's child, a handler in a main thread, not at
        all in other threads) is told in `djsupervisor.worker.stop`.
        """
        self._stop_signal.listen()
        log = logger.bind(worker=self.name)
        notifications = StepNotifications(self.name, self.notifiers, lambda: self._steps) if self.notifiers else None
        if notifications is not None:
            self._listeners.append(notifications)
        self._record.refused = None  # migrated since the last run(), perhaps
        try:
            keep_connection_id_current(self.connection)
            drop_password_variable()  # connected: what make() starts does not inherit DJ_PASS
            self._record.attempt("reading the connection id", lambda: refresh_connection_id(self.connection))
            self._record.attempt("reading the server version", lambda: note_server(self.connection))
            log.info("worker {} running {} processes: {}", self.name, len(self._steps), ", ".join(self.processes))
            began = time.monotonic()
            idle_cycles = 0
            sleep = self.sleep_duration
            while True:
                summary = self.run_once()
                if summary.idle:
                    idle_cycles += 1
                else:
                    idle_cycles, sleep = 0, self.sleep_duration
                reason = self._why_stop(began, idle_cycles, slept=False)
                if reason is None:
                    wait = max(sleep, self._outage.backoff)
                    if self.run_duration > 0:
                        wait = min(wait, max(self.run_duration - (time.monotonic() - began), 0) + 0.001)
                    self._progress.sleep(wait)
                    if summary.idle and self.max_sleep_duration is not None:
                        sleep = min(sleep * 2 if sleep > 0 else 1, self.max_sleep_duration)
                    reason = self._why_stop(began, idle_cycles, slept=True)
                if reason is not None:
                    log.info("worker {} stopping: {}", self.name, reason)
                    break
        except UpstreamWorkerSchema as refused:
            log.error("worker {} cannot run: {}", self.name, refused)  # the one line, said once
            raise
        finally:
            self._progress.set_activity("stopped")
            self._progress.heartbeat()
            self._progress.emit(WorkerEvent("stopped"))
            self._stop_signal.close()
            if notifications is not None:
                self._listeners.remove(notifications)
                notifications.close()  # what is pending goes out now, within the notifiers' timeouts

    def _why_stop(self, began: float, idle_cycles: int, *, slept: bool) -> str | None:
        """Why the loop stops now (as its log line says), or None; after the sleep, idleness is not asked again."""
        if self.stop_requested:
            return self._stop_signal.reason
        elapsed = time.monotonic() - began
        if self.run_duration > 0 and elapsed > self.run_duration:
            if slept:
                return f"run_duration {self.run_duration} s reached"
            return f"ran {elapsed:.0f} s > run_duration {self.run_duration}"
        if not slept and self.max_idled_cycle > 0 and idle_cycles > self.max_idled_cycle:
            return f"{idle_cycles} consecutive idle cycles"
        return None

    def __repr__(self) -> str:
        return f"DataJointWorker({self.name!r}, {self.worker_schema_name!r}, processes={self.processes!r})"
