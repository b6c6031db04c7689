"""What a worker is doing and has done, as its steps report it: the `StepHost` of `djsupervisor.worker.steps`.

The steps report job and callable boundaries here; `Progress` turns each report into the worker's
activity, its counters, an event for its listeners, an ErrorLog row for a failure and, while jobs run, a
RegisteredWorker heartbeat every few seconds. Keeping this apart from the loop lets the steps talk to an
object with a small public surface instead of the worker's private methods.
"""

from __future__ import annotations

from collections.abc import Callable

from loguru import logger

from djsupervisor.worker.events import Activity, State, WorkerEvent
from djsupervisor.worker.record import WorkerRecord
from djsupervisor.worker.refresh_lease import end_refresh, take_refresh_lease
from djsupervisor.worker.stop import StopSignal

_SLEEP_HEARTBEAT_GRACE = 60.0  # seconds a sleeping worker's next heartbeat may come late (slow cycle start)


class Progress:
    """The activity and counters of worker `worker_name`, updated by its steps and its loop.

    `record` writes the worker's rows; `stop_signal` is the worker's stop flag; `listeners()` returns the
    worker's listeners (read at each event: `DataJointWorker.configure` gives a copy a new list).
    """

    def __init__(
        self,
        worker_name: str,
        *,
        record: WorkerRecord,
        stop_signal: StopSignal,
        listeners: Callable[[], list[Callable[[WorkerEvent], None]]],
        refresh_interval: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.worker_name = worker_name
        self.record = record
        self.stop_signal = stop_signal
        self._listeners = listeners
        self._refresh_interval = refresh_interval
        self.activity = Activity("idle")
        self.cycles = 0
        self.jobs_done = 0
        self.jobs_failed = 0
        self.reservations_lost = 0  # reservations another worker won first (the cycles' `lost` counts)

    def may_refresh(self, table: str) -> bool:
        """Whether this cycle's first populate() of `table` refreshes its job queue: once per refresh interval
        across the fleet (`djsupervisor.worker.refresh_lease`); when the lease cannot be read, refresh."""
        interval = self._refresh_interval()
        if interval <= 0:
            return True
        schema = self.record.schema
        taken = self.record.attempt(
            "taking the refresh lease",
            lambda: take_refresh_lease(
                schema.connection, schema.tables["RefreshLease"].full_table_name, table, interval
            ),
        )
        return taken is not False

    def refresh_done(self, table: str) -> None:
        """This worker's refresh of `table`'s job queue is over, its new jobs written: the lease it took in
        `may_refresh` runs its interval from now (`djsupervisor.worker.refresh_lease.end_refresh`)."""
        if self._refresh_interval() <= 0:
            return
        schema = self.record.schema
        self.record.attempt(
            "ending the refresh lease",
            lambda: end_refresh(schema.connection, schema.tables["RefreshLease"].full_table_name, table),
        )

    def emit(self, event: WorkerEvent) -> None:
        """Hand `event` to every listener, in the worker's thread; a failing listener is logged, not raised."""
        for listener in self._listeners():
            try:
                listener(event)
            except Exception:
                logger.opt(exception=True).warning("worker listener {!r} failed", listener)

    def set_activity(self, state: State, table: str | None = None, key: dict | None = None) -> None:
        """Say what the worker is doing now."""
        self.activity = Activity(state, table, dict(key) if key is not None else None)

    def heartbeat(self, window: float | None = None) -> None:
        """Update the worker's RegisteredWorker row with what it is doing (see `WorkerRecord.heartbeat`)."""
        self.record.heartbeat(
            self.activity, cycles=self.cycles, jobs_done=self.jobs_done, jobs_failed=self.jobs_failed, window=window
        )

    def sleep(self, seconds: float) -> None:
        """Sleep between cycles, saying so to the listeners and in RegisteredWorker (with the window in which
        the next heartbeat is due), waking at once for a stop or SIGTERM."""
        if seconds <= 0:
            return
        self.set_activity("sleeping")
        self.emit(WorkerEvent("sleep", seconds=seconds))
        self.heartbeat(window=seconds + _SLEEP_HEARTBEAT_GRACE)
        self.stop_signal.wait(seconds)
        self.set_activity("running")

    # ----- StepHost

    @property
    def stop_requested(self) -> bool:
        """True once the worker was asked to stop."""
        return self.stop_signal.requested

    def stop(self, reason: str = "") -> None:
        """Ask the worker to stop at the next job boundary."""
        self.stop_signal.request(reason)

    def may_reserve(self) -> bool:
        """At a job boundary: put our SIGTERM handler back if populate replaced it; False once stopping."""
        self.stop_signal.guard_handler()
        return not self.stop_signal.requested

    def job_started(self, table: str, key: dict) -> None:
        """A job was reserved: the worker is populating `table` for `key`."""
        self.set_activity("populating", table, key)
        self.emit(WorkerEvent("job_start", table=table, key=dict(key)))
        if self.record.heartbeat_due():
            self.heartbeat()

    def reservation_lost(self, table: str, key: dict) -> None:
        """Another worker reserved the job first: counted (WorkerLog's ``lost``, the cycle's log line)."""
        self.reservations_lost += 1

    def job_ended(self, table: str, key: dict, ok: bool, message: str = "", stack: str | None = None) -> None:
        """A job completed or failed; a failure is logged and recorded, a KeyboardInterrupt in make() stops."""
        if ok:
            self.jobs_done += 1
        else:
            self.jobs_failed += 1
            logger.bind(worker=self.worker_name).error("job {} {} failed: {}", table, key, message)
            self.record.log_error("job", table, key, message, stack)
            if message.startswith("KeyboardInterrupt"):
                self.stop("KeyboardInterrupt")
        self.set_activity("populating", table, None)
        self.emit(WorkerEvent("job_end", table=table, key=dict(key), ok=ok, message=None if ok else message))

    def callable_started(self, name: str) -> None:
        """Callable `name` is about to run."""
        self.set_activity("populating", name)
        self.emit(WorkerEvent("callable_start", table=name))

    def callable_ended(self, name: str, ok: bool) -> None:
        """Callable `name` returned or raised."""
        self.emit(WorkerEvent("callable_end", table=name, ok=ok))

    def step_failed(self, kind: str, name: str, error: BaseException, stack: str) -> None:
        """A step raised outside a job: counted as a failure, logged, recorded; counts towards an outage."""
        self.jobs_failed += 1
        self.record.outage.note(error)
        message = f"{error.__class__.__name__}: {error}" if str(error) else error.__class__.__name__
        logger.bind(worker=self.worker_name).error("{} failed: {}", name, message)
        self.record.log_error(kind, name, None, message, stack)
        self.emit(WorkerEvent("step_failed", table=name, ok=False, message=message))
