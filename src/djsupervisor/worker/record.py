"""A worker process's rows in the worker tables: its registration and heartbeats, its cycles, its errors.

This is bookkeeping: none of it may end the loop. Every write goes through `WorkerRecord.attempt`, which
logs a failure as a warning (and counts it towards the outage backoff when the server was unreachable)
instead of raising; except for one thing: a worker schema made by datajoint-utilities
(`UpstreamWorkerSchema`), which no retry will fix, ends the loop with its one line instead of a warning
every cycle. The rows are keyed by the process identity (worker name, host, pid, process start),
computed again after a fork, so a forked child registers itself rather than updating its parent's row.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import datajoint as dj
from loguru import logger

from djsupervisor.log import mask_value
from djsupervisor.worker import retention
from djsupervisor.worker.cycle_log import CycleLog
from djsupervisor.worker.events import Activity, CycleSummary
from djsupervisor.worker.outage import OutageTracker
from djsupervisor.worker.schema import WorkerSchema, json_safe, process_start
from djsupervisor.worker.upstream_schema import UpstreamWorkerSchema

_DB_HEARTBEAT_INTERVAL = 5.0  # seconds between RegisteredWorker updates while jobs run
_PRUNE_INTERVAL = 3600.0  # seconds between a worker run by hand's retention passes over its worker schema


class WorkerRecord:
    """The RegisteredWorker, WorkerLog and ErrorLog rows of one worker, in the process it runs in now.

    Parameters
    ----------
    worker_name, schema_name : str
        The worker's name and the schema of its tables.
    connection : callable
        Returns the connection for the worker tables (called on first use, not before).
    settings : callable
        Returns the worker's settings and processes, JSON-ready, for its registration.
    outage : OutageTracker
        Where failures for want of the server are counted.
    """

    def __init__(
        self,
        worker_name: str,
        schema_name: str,
        *,
        connection: Callable[[], dj.Connection],
        settings: Callable[[], dict],
        outage: OutageTracker,
    ) -> None:
        self.worker_name = worker_name
        self.schema_name = schema_name
        self._connection = connection
        self._settings = settings
        self.outage = outage
        self.placement: dict = {}
        self._identity: dict | None = None
        self._schema: WorkerSchema | None = None
        self._registered_pid: int | None = None
        self._last_heartbeat = 0.0
        self.refused: UpstreamWorkerSchema | None = None  # the worker schema is datajoint-utilities'
        self._cycle_log = CycleLog(lambda: self.schema)
        self._last_prune: float | None = None
        self._idle_since: int | None = None  # the first cycle of the current idle stretch (logged once)

    def attempt(self, what: str, action: Callable[[], Any]) -> Any:
        """`action()`, or None after logging its failure (bookkeeping never ends the loop, but for a worker
        schema made by datajoint-utilities: raised, and remembered in `refused`)."""
        try:
            return action()
        except UpstreamWorkerSchema as error:
            self.refused = error
            raise
        except Exception as error:
            self.outage.note(error)
            logger.bind(worker=self.worker_name).warning("{} failed: {}: {}", what, error.__class__.__name__, error)
            return None

    def place(self, *, supervisor: str, slot: int, host: str | None, heartbeat_window: float) -> None:
        """Record where the worker runs (see `DataJointWorker.place`)."""
        self.placement = {"supervisor": supervisor, "slot": slot, "host": host, "heartbeat_window": heartbeat_window}
        self._identity = None

    def identity(self) -> dict:
        """The process identity keying the rows; a new dict after a fork or a `place()` (and the worker
        tables are then looked up again, on the new process's connection)."""
        pid = os.getpid()
        if self._identity is None or self._identity["pid"] != pid:
            host = self.placement.get("host") or platform.node()
            self._identity = dict(worker_name=self.worker_name, host=host, pid=pid, process_start=process_start(pid))
            self._schema = None
        return self._identity

    @property
    def schema(self) -> WorkerSchema:
        """The worker tables (declared on first use)."""
        self.identity()
        if self._schema is None:
            self._schema = WorkerSchema(self.schema_name, self._connection())
        return self._schema

    def heartbeat_due(self) -> bool:
        """Whether `_DB_HEARTBEAT_INTERVAL` seconds have passed since the last heartbeat (while jobs run)."""
        return time.monotonic() - self._last_heartbeat >= _DB_HEARTBEAT_INTERVAL

    def _register(self) -> None:
        identity = self.identity()
        placement = {k: v for k, v in self.placement.items() if k in ("supervisor", "slot", "heartbeat_window")}
        settings = mask_value(json_safe(self._settings()))  # a step's kwargs may hold a password
        if self.attempt(
            "registering the worker", lambda: self.schema.register(identity, settings, "running", placement)
        ):
            self._registered_pid = identity["pid"]

    def heartbeat(
        self, activity: Activity, *, cycles: int, jobs_done: int, jobs_failed: int, window: float | None = None
    ) -> None:
        """Update RegisteredWorker (registering this process first if needed). `window`: seconds by which
        the next heartbeat is due. Unknown (None) means 0 ("cannot tell": a job may run for hours) for a
        worker run by hand. A supervised worker (placed) only registers and reports its stop: its
        supervisor's fleet agent stamps its row, with the window, on a fixed period, from what the child
        reports to the parent."""
        if self.refused is not None:  # the loop is ending on it: nothing to write to
            return
        self._last_heartbeat = time.monotonic()
        if self._registered_pid != os.getpid():
            self._register()
        if activity.state == "stopped":  # the open idle stretch's last minute of counts
            self.attempt("writing WorkerLog", self._cycle_log.close)
        if self.placement:
            if activity.state != "stopped":
                return  # the fleet agent stamps the row every fleet_interval: no statements of our own
            window = None
        elif window is None:
            window = 0.0
        self.attempt(
            "heartbeat",
            lambda: self.schema.heartbeat(
                self.identity(),
                state=activity.state,
                table=activity.table,
                key=activity.key,
                cycles=cycles,
                jobs_done=jobs_done,
                jobs_failed=jobs_failed,
                window=window,
            ),
        )

    def log_cycle(self, summary: CycleSummary, durations: dict[str, float]) -> None:
        """The log line and the WorkerLog rows of the cycle `summary` describes.

        Quiet by default: a busy cycle is an INFO line, an idle one a DEBUG line; going idle and finding work
        again are one INFO line each (an idle child would otherwise say something every sleep_duration)."""
        log = logger.bind(worker=self.worker_name)
        recovered = summary.recovered_stale + summary.recovered_orphaned + summary.cleared_errors
        busy = not summary.idle or bool(summary.jobs_failed or recovered)
        if not busy and self._idle_since is None:
            self._idle_since = summary.cycle
            log.info("idle from cycle {}: nothing to do (idle cycles are logged at DEBUG)", summary.cycle)
        elif busy and self._idle_since is not None:
            log.info("found work again after {} idle cycles", summary.cycle - self._idle_since)
            self._idle_since = None
        log.log(
            "INFO" if busy else "DEBUG",
            "cycle {} done in {:.2f} s: {} jobs done, {} failed, {} reservations lost, {} re-pended, "
            "{} errors cleared{}",
            summary.cycle,
            summary.duration,
            summary.jobs_done,
            summary.jobs_failed,
            summary.reservations_lost,
            summary.recovered_stale + summary.recovered_orphaned,
            summary.cleared_errors,
            " (stopped early)" if summary.stopped_early else "",
        )
        self.attempt("writing WorkerLog", lambda: self._cycle_log.log(self.identity(), summary, durations))
        self.maybe_prune()

    def maybe_prune(self) -> None:
        """A worker run by hand prunes its worker schema (`djsupervisor.worker.retention`) after its first
        cycle and then at most every `_PRUNE_INTERVAL` seconds; a supervised one leaves it to its fleet agent."""
        now = time.monotonic()
        if self.placement or (self._last_prune is not None and now - self._last_prune < _PRUNE_INTERVAL):
            return
        self._last_prune = now
        days = self._settings()["log_retention_days"]
        result = self.attempt("pruning the worker tables", lambda: retention.prune(self.schema, days))
        if result is not None and result.total:
            logger.bind(worker=self.worker_name).info(
                "pruned {} rows older than {:g} days from {}", result.total, days, self.schema_name
            )

    def log_error(
        self,
        kind: str,
        process: str,
        key: dict | None,
        message: str,
        stack: str | None,
        when: datetime.datetime | None = None,
    ) -> None:
        """An ErrorLog row: a failed job or step (`kind` job, populate, callable) or a cleared error; known
        secrets (the database password, DJ_PASS, `log.add_secret`'s) masked."""
        message, stack = mask_value(message), mask_value(stack)
        self.attempt(
            "writing ErrorLog",
            lambda: self.schema.log_error(
                self.identity(), kind=kind, process=process, key=key, message=message, stack=stack, when=when
            ),
        )
