"""DataJointWorker: the bounded cycle loop that works a DataJoint pipeline in one process.

Each cycle:

1. recovers jobs: stale and orphaned reservations go back to pending, transient errors are cleared
   (see `djsupervisor.worker.recovery`). This runs first, so a worker that replaces a crashed one re-pends and
   then works its predecessor's jobs in the same cycle;
2. runs every registered process in registration order: tables with
   ``populate(reserve_jobs=True, suppress_errors=True, **kwargs)``, callables with ``func(**kwargs)``;
   a failing ``make()`` or callable is logged and recorded in ErrorLog, and the loop goes on;
3. logs the cycle (WorkerLog) and heartbeats (RegisteredWorker);
4. checks the stop conditions, then sleeps. After a cycle that could not reach the database server, the
   sleep is at least an outage backoff that starts at 1 s and doubles per such cycle up to 30 s, so a
   worker neither spins nor gives up while the server is away; DataJoint reconnects on the next query.

A cycle is **idle** when no table completed or failed a job and no callable reported work. A
callable reports work by returning a truthy value or a positive number (``0``, negatives, ``None``,
``False`` and empty containers report none). Re-pending jobs in step 1 is not work.

The loop stops after a complete cycle when `run_duration` > 0 and more than `run_duration` seconds have
passed since `run()` started, when `max_idled_cycle` > 0 and more than `max_idled_cycle` consecutive
cycles were idle, or when `stop()` was called (or SIGTERM arrived, see `run()`); then the cycle in
progress finishes its job in flight, starts no new job, and still logs. No new cycle begins once
`run_duration` has passed, even mid-sleep.
"""

from __future__ import annotations

import datetime
import os
import platform
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import datajoint as dj
from loguru import logger

from djsupervisor.worker import identifiers
from djsupervisor.worker.connection import (
    is_connection_error,
    keep_connection_id_current,
    note_server,
    refresh_connection_id,
    session_alive,
)
from djsupervisor.worker.events import Activity, CycleSummary, WorkerEvent
from djsupervisor.worker.recovery import JobRecovery
from djsupervisor.worker.schema import WorkerSchema, process_start
from djsupervisor.worker.settings import RECOVERY_SCOPES, WORKER_SETTING_NAMES
from djsupervisor.worker.steps import CallableStep, TableStep, make_step

_SLEEP_HEARTBEAT_GRACE = 60.0  # seconds a sleeping worker's next heartbeat may come late (slow cycle start)
_DB_HEARTBEAT_INTERVAL = 5.0  # seconds between RegisteredWorker updates while jobs run
_STOP_POLL_INTERVAL = 0.25  # how often a sleep looks for a stop requested from another thread
_OUTAGE_BACKOFF_FIRST = 1.0  # seconds to wait after a cycle that could not reach the server...
_OUTAGE_BACKOFF_MAX = 30.0  # ...doubling per such cycle up to this


def _positive_or_disabled(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
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
    connection : datajoint.Connection, optional
        Connection for the worker tables and job recovery (DataJoint's global one by default).

    Use as a decorator on a function, or call it on tables and callables::

        worker = DataJointWorker("standard", "lab_workers", sleep_duration=30)
        worker(Session)                    # an auto-populated table class or instance
        worker(Analysis, max_calls=10)     # kwargs go to populate()
        worker(notify, channel="#lab")     # a callable, called as notify(channel="#lab")
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
        connection: dj.Connection | None = None,
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
        self.run_duration = _positive_or_disabled("run_duration", run_duration)
        self.sleep_duration = _positive_or_disabled("sleep_duration", sleep_duration)
        if self.sleep_duration < 0:
            raise ValueError(f"sleep_duration must be >= 0, got {sleep_duration!r}")
        self.max_idled_cycle = _positive_or_disabled("max_idled_cycle", max_idled_cycle)
        self.stale_timeout_hours = _positive_or_disabled("stale_timeout_hours", stale_timeout_hours)
        if self.stale_timeout_hours < 0:
            raise ValueError(f"stale_timeout_hours must be >= 0, got {stale_timeout_hours!r}")
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
        if max_sleep_duration is not None:
            _positive_or_disabled("max_sleep_duration", max_sleep_duration)
            if max_sleep_duration < self.sleep_duration:
                raise ValueError(
                    f"max_sleep_duration ({max_sleep_duration!r}) must be >= sleep_duration ({sleep_duration!r})"
                )
        self.max_sleep_duration = max_sleep_duration
        self._connection = connection
        self._steps: list[TableStep | CallableStep] = []
        self._listeners: list[Callable[[WorkerEvent], None]] = []
        self._stop_event = threading.Event()
        self._stop_reason = ""
        self._sigterm_mode: str | None = None  # how SIGTERM reaches run(): "blocked", "handler" or None
        self._activity = Activity("idle")
        self._schema: WorkerSchema | None = None
        self._recovery: JobRecovery | None = None
        self._identity: dict | None = None
        self._placement: dict = {}
        self._registered_pid: int | None = None
        self._last_db_heartbeat = 0.0
        self._connection_errors = 0  # in the current cycle
        self._outage_backoff = 0.0  # extra wait while the server is unreachable
        self.cycles = 0
        self.jobs_done = 0
        self.jobs_failed = 0

    # ----- registration

    def __call__(self, process: Any, **kwargs: Any) -> DataJointWorker:
        """Register a table (class or instance) or a callable; returns the worker (so it decorates)."""
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
        worker = DataJointWorker(
            self.name, self.worker_schema_name, **{**self.settings, **overrides}, connection=self._connection
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
        return self._activity

    @property
    def connection(self) -> dj.Connection:
        """The connection for the worker tables and job recovery."""
        if self._connection is None:
            self._connection = dj.conn()
        return self._connection

    @property
    def stop_requested(self) -> bool:
        """True once `stop()` was called or (while SIGTERM is blocked in this thread) SIGTERM arrived."""
        if self._stop_event.is_set():
            return True
        if self._sigterm_mode == "blocked" and signal.SIGTERM in signal.sigpending():
            signal.sigtimedwait([signal.SIGTERM], 0)  # consume it: it has been turned into this stop
            self.stop("SIGTERM")
            return True
        return False

    def stop(self, reason: str = "") -> None:
        """Ask the loop to stop at the next job boundary; safe from other threads and signal handlers.

        The job in flight finishes, no new job starts, the cycle's logging still happens, and `run()`
        returns without sleeping.
        """
        if not self._stop_event.is_set():
            self._stop_reason = reason or "stop requested"
            self._stop_event.set()

    def _on_sigterm(self, signum, frame) -> None:
        self.stop("SIGTERM")

    def _guard_sigterm(self) -> None:
        """Put our SIGTERM handler back if DataJoint's populate replaced it (called at each job boundary)."""
        if self._sigterm_mode == "handler" and signal.getsignal(signal.SIGTERM) is not self._on_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _emit(self, event: WorkerEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                logger.opt(exception=True).warning("worker listener {!r} failed", listener)

    def _set_activity(self, state: str, table: str | None = None, key: dict | None = None) -> None:
        self._activity = Activity(state, table, dict(key) if key is not None else None)

    # ----- callbacks from the steps

    def _job_started(self, table: str, key: dict) -> None:
        self._set_activity("populating", table, key)
        self._emit(WorkerEvent("job_start", table=table, key=dict(key)))
        if time.monotonic() - self._last_db_heartbeat >= _DB_HEARTBEAT_INTERVAL:
            self._heartbeat()

    def _job_ended(self, table: str, key: dict, ok: bool, message: str = "", stack: str | None = None) -> None:
        if ok:
            self.jobs_done += 1
        else:
            self.jobs_failed += 1
            logger.bind(worker=self.name).error("job {} {} failed: {}", table, key, message)
            self._log_error("job", table, key, message, stack)
            if message.startswith("KeyboardInterrupt"):
                self.stop("KeyboardInterrupt")
        self._set_activity("populating", table, None)
        self._emit(WorkerEvent("job_end", table=table, key=dict(key), ok=ok))

    def _callable_started(self, name: str) -> None:
        self._set_activity("populating", name)
        self._emit(WorkerEvent("callable_start", table=name))

    def _callable_ended(self, name: str, ok: bool) -> None:
        self._emit(WorkerEvent("callable_end", table=name, ok=ok))

    def _step_failed(self, kind: str, name: str, error: BaseException, stack: str) -> None:
        self.jobs_failed += 1
        if is_connection_error(error):
            self._connection_errors += 1
        message = f"{error.__class__.__name__}: {error}" if str(error) else error.__class__.__name__
        logger.bind(worker=self.name).error("{} failed: {}", name, message)
        self._log_error(kind, name, None, message, stack)

    # ----- bookkeeping (never allowed to end the loop)

    def _bookkeeping(self, what: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except Exception as error:
            if is_connection_error(error):
                self._connection_errors += 1
            logger.bind(worker=self.name).warning("{} failed: {}: {}", what, error.__class__.__name__, error)
            return None

    def place(self, *, supervisor: str, slot: int, host: str | None = None, heartbeat_window: float = 0.0) -> None:
        """Record where this worker runs, for the fleet registry (djsupervisor's children call this).

        `host` replaces the machine's host name in RegisteredWorker, WorkerLog and ErrorLog (a pod's or
        a Slurm node's name, say). `heartbeat_window`: seconds within which the supervisor's fleet agent
        stamps this process's row again; it owns the window from then on."""
        self._placement = {"supervisor": supervisor, "slot": slot, "host": host, "heartbeat_window": heartbeat_window}
        self._identity = None

    def _process_identity(self) -> dict:
        pid = os.getpid()
        if self._identity is None or self._identity["pid"] != pid:
            host = self._placement.get("host") or platform.node()
            self._identity = dict(worker_name=self.name, host=host, pid=pid, process_start=process_start(pid))
            self._schema = None
            self._recovery = None
        return self._identity

    @property
    def schema(self) -> WorkerSchema:
        """The worker tables (declared on first use)."""
        self._process_identity()
        if self._schema is None:
            self._schema = WorkerSchema(self.worker_schema_name, self.connection)
        return self._schema

    def _register(self) -> None:
        identity = self._process_identity()
        settings = dict(self.settings, processes=[s.describe() for s in self._steps])
        placement = {k: v for k, v in self._placement.items() if k in ("supervisor", "slot", "heartbeat_window")}
        if self._bookkeeping(
            "registering the worker", lambda: self.schema.register(identity, settings, "running", placement)
        ):
            self._registered_pid = identity["pid"]

    def _heartbeat(self, window: float | None = None) -> None:
        """Update RegisteredWorker. `window`: seconds by which the next heartbeat is due. Unknown (None)
        means 0 ("cannot tell": a job may run for hours) for a worker run by hand. A supervised worker
        (placed) only registers and reports its stop: its supervisor's fleet agent stamps its row, with
        the window, on a fixed period, from what the child reports to the parent."""
        self._last_db_heartbeat = time.monotonic()
        if self._registered_pid != os.getpid():
            self._register()
        activity = self._activity
        if self._placement:
            if activity.state != "stopped":
                return  # the fleet agent stamps the row every fleet_interval: no statements of our own
            window = None
        elif window is None:
            window = 0.0
        self._bookkeeping(
            "heartbeat",
            lambda: self.schema.heartbeat(
                self._process_identity(),
                state=activity.state,
                table=activity.table,
                key=activity.key,
                cycles=self.cycles,
                jobs_done=self.jobs_done,
                jobs_failed=self.jobs_failed,
                window=window,
            ),
        )

    def _log_error(
        self,
        kind: str,
        process: str,
        key: dict | None,
        message: str,
        stack: str | None,
        when: datetime.datetime | None = None,
    ) -> None:
        self._bookkeeping(
            "writing ErrorLog",
            lambda: self.schema.log_error(
                self._process_identity(), kind=kind, process=process, key=key, message=message, stack=stack, when=when
            ),
        )

    def _record_cleared_error(self, table: str, key: dict, message: str, stack: str, when) -> None:
        self._log_error("cleared", table, key, message, stack, when)

    def _recover(self, summary: CycleSummary) -> None:
        self._process_identity()
        if self._recovery is None:
            self._recovery = JobRecovery(
                self.connection,
                tables=self.job_tables,
                stale_timeout_hours=self.stale_timeout_hours,
                db_prefix=self.db_prefix if self.recovery_scope == "db_prefix" else None,
                autoclear_error_patterns=self.autoclear_error_patterns,
                on_cleared_error=self._record_cleared_error,
            )
        own = [step.job_table_id for step in self._steps if isinstance(step, TableStep) and step.job_table_id]
        counts = self._bookkeeping("job recovery", lambda: self._recovery.run(own))
        if counts is not None:
            summary.recovered_stale = counts.stale
            summary.recovered_orphaned = counts.orphaned
            summary.cleared_errors = counts.cleared

    # ----- the loop

    def run_once(self) -> CycleSummary:
        """Run one cycle (recovery, every process, logging) and return what it did."""
        self.cycles += 1
        self._connection_errors = 0
        summary = CycleSummary(cycle=self.cycles, started=time.time())
        started = time.monotonic()
        self._set_activity("running")
        self._emit(WorkerEvent("cycle_start"))
        if self._outage_backoff:
            self._reconnect_lost_connections()
        self._heartbeat()
        self._recover(summary)
        durations: dict[str, float] = {}
        for step in self._steps:
            if self.stop_requested:
                summary.stopped_early = True
                break
            step_started = time.monotonic()
            summary.processes[step.name] = step.run(self)
            durations[step.name] = time.monotonic() - step_started
            self._set_activity("running")
        summary.duration = time.monotonic() - started
        log = logger.bind(worker=self.name)
        log.info(
            "cycle {} done in {:.2f} s: {} jobs done, {} failed, {} re-pended, {} errors cleared{}",
            summary.cycle,
            summary.duration,
            summary.jobs_done,
            summary.jobs_failed,
            summary.recovered_stale + summary.recovered_orphaned,
            summary.cleared_errors,
            " (stopped early)" if summary.stopped_early else "",
        )
        self._bookkeeping(
            "writing WorkerLog", lambda: self.schema.log_cycle(self._process_identity(), summary, durations)
        )
        self._heartbeat()
        self._track_outage()
        self._emit(WorkerEvent("cycle_end", summary=summary))
        return summary

    def _connections(self) -> list[dj.Connection]:
        """The worker's connection and those of its tables, each once."""
        found = {id(self.connection): self.connection}
        for step in self._steps:
            if isinstance(step, TableStep):
                found.setdefault(id(step.table.connection), step.table.connection)
        return list(found.values())

    def _reconnect_lost_connections(self) -> None:
        """After an outage, reconnect sessions the driver has given up on (psycopg2 does not reconnect)."""
        for connection in self._connections():
            if not session_alive(connection):
                self._bookkeeping("reconnecting", connection.connect)

    def _track_outage(self) -> None:
        """Grow the outage backoff after a cycle that could not reach the server; reset it after one that did."""
        if self._connection_errors:
            self._outage_backoff = min(max(self._outage_backoff * 2, _OUTAGE_BACKOFF_FIRST), _OUTAGE_BACKOFF_MAX)
            logger.bind(worker=self.name).warning(
                "database unreachable ({} failed calls this cycle); next cycle in at least {:.0f} s",
                self._connection_errors,
                self._outage_backoff,
            )
        elif self._outage_backoff:
            logger.bind(worker=self.name).info("database reachable again")
            self._outage_backoff = 0.0

    def run(self) -> None:
        """Run cycles until a stop condition holds (see the module docstring), then return.

        SIGTERM asks for a graceful stop, like `stop()`: the job in flight finishes and no new one starts.
        Where SIGTERM is blocked when `run()` starts (a supervisor's child blocks it right after fork, so
        that every thread inherits the block), a pending SIGTERM is read at each job boundary and during
        the sleep. Otherwise, in the main thread, `run()` installs a SIGTERM handler that calls `stop()`,
        and puts it back each time DataJoint's populate replaces it with its own (which would abort the
        job in flight and record it as an error); the previous handler is restored when `run()` returns.
        Elsewhere only `stop()` stops the loop.
        """
        previous_handler = None
        if signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []):
            self._sigterm_mode = "blocked"
        elif threading.current_thread() is threading.main_thread():
            self._sigterm_mode = "handler"
            previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        log = logger.bind(worker=self.name)
        try:
            keep_connection_id_current(self.connection)
            self._bookkeeping("reading the connection id", lambda: refresh_connection_id(self.connection))
            self._bookkeeping("reading the server version", lambda: note_server(self.connection))
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
                if self.stop_requested:
                    log.info("worker {} stopping: {}", self.name, self._stop_reason)
                    break
                elapsed = time.monotonic() - began
                if self.run_duration > 0 and elapsed > self.run_duration:
                    log.info(
                        "worker {} stopping: ran {:.0f} s > run_duration {}", self.name, elapsed, self.run_duration
                    )
                    break
                if self.max_idled_cycle > 0 and idle_cycles > self.max_idled_cycle:
                    log.info("worker {} stopping: {} consecutive idle cycles", self.name, idle_cycles)
                    break
                wait = max(sleep, self._outage_backoff)
                if self.run_duration > 0:
                    wait = min(wait, max(self.run_duration - elapsed, 0) + 0.001)
                self._sleep(wait)
                if summary.idle and self.max_sleep_duration is not None:
                    sleep = min(sleep * 2 if sleep > 0 else 1, self.max_sleep_duration)
                if self.stop_requested:
                    log.info("worker {} stopping: {}", self.name, self._stop_reason)
                    break
                if self.run_duration > 0 and time.monotonic() - began > self.run_duration:
                    log.info("worker {} stopping: run_duration {} s reached", self.name, self.run_duration)
                    break
        finally:
            self._set_activity("stopped")
            self._heartbeat()
            self._emit(WorkerEvent("stopped"))
            if self._sigterm_mode == "handler":
                signal.signal(signal.SIGTERM, previous_handler)
            self._sigterm_mode = None
            self._stop_event.clear()

    def _sleep(self, seconds: float) -> None:
        """Sleep between cycles, waking at once for a stop or SIGTERM."""
        if seconds <= 0:
            return
        self._set_activity("sleeping")
        self._emit(WorkerEvent("sleep", seconds=seconds))
        self._heartbeat(window=seconds + _SLEEP_HEARTBEAT_GRACE)
        deadline = time.monotonic() + seconds
        while not self.stop_requested:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self._sigterm_mode == "blocked":
                if signal.sigtimedwait([signal.SIGTERM], min(remaining, _STOP_POLL_INTERVAL)) is not None:
                    self.stop("SIGTERM")
            else:
                self._stop_event.wait(min(remaining, _STOP_POLL_INTERVAL))
        self._set_activity("running")

    def __repr__(self) -> str:
        return f"DataJointWorker({self.name!r}, {self.worker_schema_name!r}, processes={self.processes!r})"
