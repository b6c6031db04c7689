"""Everything a supervisor's child does after fork: isolate itself, reconnect, run its worker, report.

`run_child` never returns: the child ends with `os._exit` (`djsupervisor.supervisor.fork.run_then_exit`).
The order matters:

1. Isolate (`djsupervisor.supervisor.fork.isolate`): the parent's signal handlers reset, every signal but
   SIGTERM unblocked (SIGTERM stays blocked for good, in every thread created later too, so DataJoint's
   populate handler never sees it and `DataJointWorker.run()` reads it at job boundaries: the job in
   flight finishes, no new one starts), own process group, death with the parent, the parent's
   descriptors closed, `random` reseeded.
2. Set the process title, start reporting.
3. Reconnect every DataJoint connection the worker uses (fork-safe: the parent's session is untouched).
4. If the previous child of this slot died in a job, settle that job with how it died (counted toward its
   `max_attempts`; `djsupervisor.worker.dead_jobs`), before this worker's first cycle, whose recovery
   would otherwise settle it with a generic reason.
5. Run the worker; stop it after `max_jobs` jobs.

(Between 1 and 2, a child of a GPU pool sets its slot's ``CUDA_VISIBLE_DEVICES``: `djsupervisor.supervisor.gpus`.)

Reporting: `protocol.ChildReportMessage` snapshots, as JSON lines on a pipe to the parent, sent on worker
events (throttled) and every `heartbeat_interval` seconds by a small daemon thread, so the parent hears from
the child while a long `make()` blocks the main thread and while it sleeps. A thread rather than SIGALRM: an interval
timer would interrupt `make()`'s system calls and the database driver's, a thread costs nothing of the
kind. The thread only formats a snapshot of counters and writes it (non-blocking; dropped if the pipe is
full, the next one carries the same information). The parent tells a hung main thread from a slow one by
`stalled`: seconds without a worker event, outside a job and net of the announced sleep. (A worker that
uses ``populate(processes=N)`` forks while this thread exists; the forked pool processes only run
``make()`` and never touch the thread's lock.)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING, overload

import setproctitle

from djsupervisor.protocol import ChildReportMessage, encode
from djsupervisor.supervisor.fork import EXIT_ERROR, EXIT_OK, EXIT_ORPHANED, EXIT_RECYCLE, isolate, run_then_exit
from djsupervisor.supervisor.gpus import apply_in_child

if TYPE_CHECKING:
    import datajoint as dj

    from djsupervisor.worker.loop import DataJointWorker

setproctitle.getproctitle()  # initialise before anything changes the environment (gunicorn #3430)

_CONNECT_RETRY_FIRST = 1.0  # seconds before retrying to connect at start, doubling up to _CONNECT_RETRY_MAX
_CONNECT_RETRY_MAX = 30.0
_THROTTLE = 0.1  # seconds between event-driven reports (heartbeats and key events are never throttled)
# A job's start is always reported: if the child dies in it, the parent must know which job it was (the
# job's failure, counted toward its max_attempts) and not take the death for a start-up failure.
_ALWAYS_REPORTED = {"sleep", "stopped", "job_start"}
# Not reported by themselves: the next report (a job event, a long sleep, the heartbeat) carries them, so
# a fleet of idle children polling every second does not wake the parent three times a second each. A
# sleep shorter than the heartbeat interval is carried the same way.
_CARRIED = {"cycle_start", "cycle_end"}
# Report lines stay below PIPE_BUF (4096 bytes on Linux): a write that small is atomic, so the heartbeat
# thread's lines and the main thread's never interleave. A longer one goes without its key.
_MAX_REPORT_BYTES = 3500


def worker_connections(worker: DataJointWorker) -> list[dj.Connection]:
    """Every distinct DataJoint connection the worker and its tables use (the global one included); DataJoint's
    global connection, opened now, when none is open yet."""
    import datajoint as dj

    return worker.held_connections() or [dj.conn()]


@overload
def _short_table(table: str) -> str: ...
@overload
def _short_table(table: None) -> None: ...
def _short_table(table: str | None) -> str | None:
    """`schema`.`__table` -> schema.__table (quotes of either backend dropped)."""
    return table.replace("`", "").replace('"', "") if table else table


class Reporter:
    """Sends the child's state to the parent and keeps the process title current."""

    def __init__(self, fd: int, supervisor: str, label: str, parent_pid: int, interval: float) -> None:
        self.fd = fd
        os.set_blocking(fd, False)  # a stalled parent must never stall the worker
        self.title_prefix = f"djsupervisor: {supervisor} {label}"
        self.parent_pid = parent_pid
        self.interval = interval
        self.lock = threading.Lock()
        self.worker = None
        self.state = "idle"
        self.table: str | None = None
        self.key: dict | None = None
        self.cycles_done = 0
        self.job_started: float | None = None  # monotonic, while a job or callable runs
        self.last_event = time.monotonic()
        self.sleep_seconds = 0.0
        self.last_sent = 0.0
        self.title = ""
        self._closed = threading.Event()
        self._unsent = threading.Event()  # an event was throttled: its state is not with the parent yet
        self.set_title("idle")

    def set_title(self, state: str) -> None:
        title = f"{self.title_prefix} {state}"
        if title != self.title:
            self.title = title
            setproctitle.setproctitle(title)

    def snapshot(self) -> ChildReportMessage:
        now = time.monotonic()
        worker = self.worker
        job_elapsed = now - self.job_started if self.job_started is not None else None
        stalled = None
        if job_elapsed is None:
            stalled = max(0.0, now - self.last_event - (self.sleep_seconds if self.state == "sleeping" else 0.0))
        return {
            "pid": os.getpid(),
            "state": self.state,
            "table": _short_table(self.table),
            "key": self.key,
            "jobs_done": worker.jobs_done if worker else 0,
            "jobs_failed": worker.jobs_failed if worker else 0,
            "cycles_done": self.cycles_done,
            "job_elapsed": round(job_elapsed, 3) if job_elapsed is not None else None,
            "stalled": round(stalled, 3) if stalled is not None else None,
        }

    def send(self, extra: ChildReportMessage | None = None) -> None:
        """Write one snapshot line (dropped if the pipe is full: the next one says the same)."""
        message = self.snapshot()
        if extra:
            message.update(extra)
        line = encode(message)
        if len(line) > _MAX_REPORT_BYTES:
            message["key"] = None
            line = encode(message)
        with self.lock:
            self._unsent.clear()
            self.last_sent = time.monotonic()
            try:
                os.write(self.fd, line)
            except BlockingIOError:
                pass
            except OSError:  # the parent is gone; PR_SET_PDEATHSIG normally got here first
                os._exit(EXIT_ORPHANED)

    def on_event(self, event) -> None:
        """Worker listener: track what the worker does, retitle, report."""
        now = time.monotonic()
        self.last_event = now
        kind = event.kind
        if kind in ("job_start", "callable_start"):
            self.state, self.table, self.key, self.job_started = "populating", event.table, event.key, now
        elif kind in ("job_end", "callable_end"):
            self.job_started = None
            self.key = None
        elif kind == "cycle_start":
            self.state, self.table, self.key = "running", None, None
        elif kind == "cycle_end":
            self.cycles_done += 1
            self.state, self.table, self.key = "running", None, None
        elif kind == "sleep":
            self.state, self.table, self.key = "sleeping", None, None
            self.sleep_seconds = event.seconds or 0.0
        elif kind == "stopped":
            self.state, self.table, self.key, self.job_started = "stopped", None, None, None
        self.set_title(
            (_short_table(self.table) or "populating")  # a job always names its table
            if self.state == "populating"
            else ("sleeping" if self.state == "sleeping" else "idle")
        )
        if kind == "sleep" and self.sleep_seconds < self.interval:
            return
        first_cycle_done = kind == "cycle_end" and self.cycles_done == 1  # the parent's "got going": at once
        if kind in _ALWAYS_REPORTED or first_cycle_done or (kind not in _CARRIED and now - self.last_sent >= _THROTTLE):
            self.send({"event": kind})
        elif kind not in _CARRIED:  # (a carried event waits for the next report, as its name says: sent
            # `_THROTTLE` later too, an idle child's cycle woke the parent every second: 64 idle children
            # cost it 2.5 % of a core against 0.3 %, bench figure 4)
            self._unsent.set()  # the heartbeat thread sends it `_THROTTLE` after the last report

    def beat(self) -> None:
        """The heartbeat thread: a snapshot every `interval` seconds until closed, and the state a throttled
        event left `_THROTTLE` after the last report. Without that last word, a job shorter than the throttle
        was still the child's job for the parent until the next heartbeat (5 s by default): a `job_timeout`
        of 2 s killed an idle child for a 50 ms job it had finished seconds before."""
        while not self._closed.is_set():
            unsent = self._unsent.wait(self.interval)
            if self._closed.is_set():
                return
            if os.getppid() != self.parent_pid:
                os._exit(EXIT_ORPHANED)
            if unsent:
                self._closed.wait(max(0.0, self.last_sent + _THROTTLE - time.monotonic()))
                if self._unsent.is_set():  # (a report from the main thread may have said it meanwhile)
                    self.send()
            elif time.monotonic() - self.last_sent >= self.interval * 0.5:
                self.send()

    def start(self) -> None:
        threading.Thread(target=self.beat, name="djsupervisor-heartbeat", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._unsent.set()  # wakes the heartbeat thread, which then ends


def settle_died_job(worker: DataJointWorker, job: dict, log) -> None:
    """Settle the job the previous child died in (re-pended after a delay, or given up after max_attempts)."""
    from djsupervisor.worker.attempts import attempt_book
    from djsupervisor.worker.dead_jobs import settle_dead_job

    try:
        done = settle_dead_job(worker.connection, job, attempt_book(worker))
    except Exception as error:  # its recovery will re-pend it with a generic reason
        log.warning("could not settle job {} {} (a child died in it): {}", job["table"], job["key"], error)
        return
    log.warning("job {} {} ({} {}): {}", job["table"], job["key"], job["kind"], job["reason"], done)


def connect_until_stopped(connections: list, reporter: Reporter, log) -> bool:
    """Reconnect every connection after fork, retrying while the server is unreachable (1 s, doubling to
    30 s), so that a child started during an outage waits it out instead of exiting over and over into
    FATAL. Returns False if SIGTERM (blocked in the child, read here) came first."""
    from djsupervisor.worker.connection import is_connection_error, reconnect_after_fork

    delay = _CONNECT_RETRY_FIRST
    pending = list(connections)
    while True:
        try:
            while pending:
                reconnect_after_fork(pending[0])
                pending.pop(0)
            return True
        except Exception as error:
            if not is_connection_error(error):
                raise
            log.warning(
                "database unreachable at start ({}: {}); retrying in {:.0f} s",
                error.__class__.__name__,
                str(error).splitlines()[0] if str(error) else "",
                delay,
            )
            reporter.send({"event": "connecting"})
            if signal.sigtimedwait([signal.SIGTERM], delay) is not None:
                return False
            delay = min(delay * 2, _CONNECT_RETRY_MAX)


def run_recovery(
    *, supervisor: str, worker_configs: list, died_jobs: list[tuple[str, dict]], parent_pid: int, close_fds: list[int]
) -> None:
    """The body of a short-lived recovery child; never returns.

    Re-pends the jobs of children that are gone when no replacement will do it in its first cycle
    (after a fast stop, or when a slot gave up): first the jobs children died in (`died_jobs`: definition
    name, job), then one pass of `recover_jobs` per distinct worker scope, a second one a moment later for
    sessions the server had not yet seen close.
    """

    def body() -> int:
        isolate(parent_pid, close_fds)
        setproctitle.setproctitle(f"djsupervisor: {supervisor} recovery")
        from loguru import logger

        from djsupervisor.worker.attempts import attempt_book
        from djsupervisor.worker.connection import reconnect_after_fork
        from djsupervisor.worker.recovery import recover_jobs

        log = logger.bind(supervisor=supervisor, worker="recovery", slot="-")
        reconnected: set[int] = set()
        scopes: dict[tuple, DataJointWorker] = {}
        workers: dict[str, DataJointWorker] = {}
        for worker_config in worker_configs:
            worker = workers[worker_config.name] = worker_config.build_worker()
            for connection in worker_connections(worker):
                if id(connection) not in reconnected:
                    reconnect_after_fork(connection)
                    reconnected.add(id(connection))
            prefix = worker.db_prefix if worker.recovery_scope == "db_prefix" else None
            scope = (tuple(worker.job_tables), prefix, worker.stale_timeout_hours, id(worker.connection))
            scopes.setdefault(scope, worker)
        for name, job in died_jobs:
            settle_died_job(workers[name], job, log)
        for attempt in range(2):
            if attempt:
                time.sleep(0.5)
            for tables, prefix, stale_timeout_hours, _ in scopes:
                worker = scopes[tables, prefix, stale_timeout_hours, _]
                counts = recover_jobs(
                    worker.connection,
                    tables=tables,
                    db_prefix=prefix,
                    stale_timeout_hours=stale_timeout_hours,
                    attempts=attempt_book(worker),
                )
                if counts.orphaned or counts.stale:
                    log.info("re-pended {} orphaned and {} stale reservations", counts.orphaned, counts.stale)
        return EXIT_OK

    run_then_exit(body)


def run_child(
    *,
    supervisor: str,
    worker_config,
    slot_index: int,
    parent_pid: int,
    report_fd: int,
    close_fds: list[int],
    heartbeat_interval: float,
    died_job: dict | None,
    host: str = "",
    fleet_window: float = 0.0,
) -> None:
    """The body of a forked child; never returns."""

    def body() -> int:
        isolate(parent_pid, close_fds)
        apply_in_child(worker_config, slot_index)  # the slot's GPU, before any of the worker's code runs
        from loguru import logger

        label = f"{worker_config.name}[{slot_index}]"
        logger.configure(extra=dict(supervisor=supervisor, worker=worker_config.name, slot=slot_index))
        log = logger.bind(supervisor=supervisor, worker=worker_config.name, slot=slot_index)
        reporter = Reporter(report_fd, supervisor, label, parent_pid, heartbeat_interval)
        reporter.start()
        reporter.send({"event": "forked"})

        worker = worker_config.build_worker()
        worker.place(supervisor=supervisor, slot=slot_index, host=host or None, heartbeat_window=fleet_window)
        connections = worker_connections(worker)
        if not connect_until_stopped(connections, reporter, log):
            log.info("child {} stopped before it could connect", label)
            return EXIT_OK
        from djsupervisor.worker.connection import drop_password_variable

        drop_password_variable()  # the subprocesses that make() starts need not inherit DJ_PASS
        reporter.worker = worker
        reporter.send({"event": "connected", "connection_ids": [c.connection_id for c in connections]})
        if died_job:
            settle_died_job(worker, died_job, log)

        recycle = threading.Event()
        if worker_config.max_jobs:

            def enforce_max_jobs(event) -> None:
                if event.kind == "job_end" and worker.jobs_done + worker.jobs_failed >= worker_config.max_jobs:
                    recycle.set()
                    worker.stop(f"max_jobs {worker_config.max_jobs} reached")

            worker.add_listener(enforce_max_jobs)
        worker.add_listener(reporter.on_event)
        log.info("child {} (pid {}) running", label, os.getpid())
        from djsupervisor.worker.upstream_schema import UpstreamWorkerSchema

        try:
            worker.run()
        except UpstreamWorkerSchema:  # run() said it in one line; a traceback would only repeat it
            return EXIT_ERROR
        reporter.close()
        return EXIT_RECYCLE if recycle.is_set() else EXIT_OK

    run_then_exit(body)
