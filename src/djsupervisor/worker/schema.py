"""The worker schema: RegisteredWorker, WorkerLog and ErrorLog.

Declared lazily, on a worker's first cycle, in the schema the worker is given. Many workers on many hosts
may declare and write at once: the schema is created with IF NOT EXISTS, tables are declared with a retry
(PostgreSQL's concurrent CREATE TABLE IF NOT EXISTS can still collide in its catalog), and every row is
keyed by something no other process writes (a UUID, or the process identity).
"""

from __future__ import annotations

import datetime
import functools
import json
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import datajoint as dj
import psutil
from loguru import logger

from djsupervisor.worker import compat, identifiers
from djsupervisor.worker.connection import is_connection_error
from djsupervisor.worker.upstream_schema import refuse_upstream

T = TypeVar("T")

_DECLARE_ATTEMPTS = 6


def json_safe(value: Any) -> Any:
    """`value` with everything JSON cannot hold turned into text (dates, UUIDs, bytes, numpy scalars)."""
    return json.loads(json.dumps(value, default=str))


def declare_with_retry(action: Callable[[], T], what: str) -> T:
    """Run a declaration that another process may be running at the same moment, retrying on a collision.

    CREATE ... IF NOT EXISTS is not enough on PostgreSQL: two sessions creating the same table at once can
    still collide in its catalog (unique violation on pg_type, DuplicateTable on an index).
    """
    for attempt in range(_DECLARE_ATTEMPTS):
        try:
            return action()
        except Exception as error:
            if attempt == _DECLARE_ATTEMPTS - 1 or is_connection_error(error):
                raise
            logger.debug("declaring {} (attempt {}): {}", what, attempt + 1, error)
            time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
    raise AssertionError("unreachable")


def _declare_schema(connection: dj.Connection, schema_name: str) -> None:
    # A worker account granted only its tables (README, Security) may not CREATE: an existing schema is left
    # alone. PostgreSQL's information_schema lists only the schemas a role owns; pg_namespace lists all.
    backend = compat.backend(connection)
    catalog = (
        "SELECT 1 FROM pg_namespace WHERE nspname = %s"
        if backend == "postgresql"
        else "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s"
    )
    if connection.query(catalog, (schema_name,)).fetchone():
        return
    quoted = identifiers.quote(backend, schema_name)
    if backend == "postgresql":
        connection.query(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
    else:
        connection.query(f"CREATE DATABASE IF NOT EXISTS {quoted}")


def _define_tables(schema: dj.Schema) -> dict[str, Any]:
    @schema
    class RegisteredWorker(dj.Manual):
        definition = """
        # One row per worker process: who it is, its settings, and what it is doing
        worker_name     : varchar(64)
        host            : varchar(255)
        pid             : int32
        process_start   : datetime(3)     # when the process started (tells reused pids apart)
        ---
        settings        : json            # the worker's settings and registered processes
        connection_id   : int64           # the process's database session
        supervisor=""   : varchar(64)     # the djsupervisor that runs it ("" when run by hand)
        slot=-1         : int32           # its slot in that supervisor's pool (-1 when run by hand)
        state           : varchar(32)     # idle, running, populating, sleeping, stopped, exited
        current_table="" : varchar(255)   # the table or callable it is working on
        current_key=null : json
        cycles=0        : int64
        jobs_done=0     : int64
        jobs_failed=0   : int64
        last_heartbeat  : datetime(3)     # by the database server's clock
        heartbeat_window=0 : float64      # seconds after last_heartbeat by which the next is due (0: unknown)
        """

    @schema
    class FleetFlag(dj.Manual):
        definition = """
        # Drain and halt flags: children of matching pools finish their job in flight and stop
        host            : varchar(255)    # a host name, or * for every host
        supervisor      : varchar(64)     # a supervisor name, or *
        worker_name     : varchar(64)     # a worker definition (pool) name, or *
        ---
        mode            : varchar(8)      # drain: children stop; halt: and the supervisor exits
        set_by          : varchar(255)    # the database account that set it (its CURRENT_USER)
        set_at          : datetime(3)
        """

    @schema
    class WorkerLog(dj.Manual):
        definition = """
        # What each cycle of each worker process did: one row per registered process and busy cycle, or idle stretch
        log_id          : char(32)        # a random UUID, hex
        ---
        worker_name     : varchar(64)
        host            : varchar(255)
        pid             : int32
        cycle           : int32           # the cycle (an idle stretch: its first)
        process         : varchar(255)    # table full name or callable name
        log_time        : datetime(3)     # when the cycle (an idle stretch: its first cycle) started
        jobs_done       : int32
        jobs_failed     : int32
        lost=0          : int32           # reservations the database refused: another worker had the job first
        duration        : float64         # seconds spent in this process (an idle stretch: in all its cycles)
        recovered=0     : int32           # (on the cycle's first row) stale + orphaned jobs re-pended
        cleared=0       : int32           # (on the cycle's first row) transient errors re-pended
        idle_cycles=0   : int32           # an idle stretch: the idle cycles it stands for; 0: a cycle that did work
        last_time=null  : datetime(3)     # an idle stretch: when its last cycle started
        INDEX (worker_name, log_time)
        INDEX (log_time)
        """

    @schema
    class ErrorLog(dj.Manual):
        definition = """
        # Every failed job or callable, and every error a worker cleared for retry
        error_id        : char(32)        # a random UUID, hex
        ---
        worker_name     : varchar(64)
        host            : varchar(255)
        pid             : int32
        error_time      : datetime(3)
        kind            : varchar(16)     # job, callable, or cleared (a transient error re-pended)
        process         : varchar(255)    # table full name or callable name
        key=null        : json
        error_message   : varchar(2047)
        error_stack=null : <blob>
        INDEX (worker_name, error_time)
        INDEX (error_time)
        """

    @schema
    class JobAttempt(dj.Manual):
        definition = """
        # Failed attempts at a job, shared by every host: its process died, it timed out, a transient error
        table_name      : varchar(255)    # the auto-populated table's full name
        key_hash        : char(32)        # md5 of the job's key (see djsupervisor.worker.attempts.key_hash)
        ---
        job_key         : json
        attempts        : int32
        incident        : varchar(255)    # the last failure counted: a reservation's holder, an error's time
        kind            : varchar(16)     # died, timeout, stale or transient
        reason          : varchar(2047)   # the last failure, in one line
        last_time       : datetime(3)
        INDEX (last_time)
        """

    @schema
    class RefreshLease(dj.Manual):
        definition = """
        # When each table's job queue was last refreshed: one refresh per table and interval across the fleet
        table_name      : varchar(255)    # the auto-populated table's full name
        ---
        refreshed_at    : datetime(3)     # by the database server's clock
        refreshed_by    : varchar(255)    # host:pid of the process that refreshed
        """

    return dict(
        RefreshLease=RefreshLease,
        RegisteredWorker=RegisteredWorker,
        WorkerLog=WorkerLog,
        ErrorLog=ErrorLog,
        FleetFlag=FleetFlag,
        JobAttempt=JobAttempt,
    )


def _fit(rows: list[dict], names: list[str]) -> list[dict]:
    """Rows without the columns a table declared by an older release lacks (WorkerLog: idle_cycles and
    last_time before 0.2, lost before issue 15's contention count)."""
    return [{k: v for k, v in row.items() if k in names} for row in rows]


_HEARTBEAT_FIELDS = (
    "state",
    "current_table",
    "current_key",
    "cycles",
    "jobs_done",
    "jobs_failed",
    "heartbeat_window",
    "connection_id",
    "supervisor",
    "slot",
)
_IDENTITY_FIELDS = ("worker_name", "host", "pid", "process_start")


def process_start(pid: int) -> datetime.datetime:
    """When process `pid` started, to the millisecond (RegisteredWorker's process_start)."""
    started = datetime.datetime.fromtimestamp(psutil.Process(pid).create_time())
    return started.replace(microsecond=started.microsecond // 1000 * 1000)


def update_heartbeats(connection: dj.Connection, table: str, rows: list[dict]) -> int:
    """Set the given fields of existing RegisteredWorker rows and stamp them with the server's clock.

    Each row holds the identity (worker_name, host, pid, process_start) and any of the heartbeat fields.
    LOCALTIMESTAMP is the server's time in the session's zone, the same on every host that reads it back
    (client clocks and time zones may differ). Returns how many rows existed.
    """
    q = functools.partial(identifiers.quote, compat.backend(connection))
    found = 0
    for row in rows:
        fields = [f for f in _HEARTBEAT_FIELDS if f in row]
        values = [
            json.dumps(json_safe(row[f])) if f == "current_key" and row[f] is not None else row[f] for f in fields
        ]
        assignments = ", ".join(f"{q(f)} = %s" for f in fields)
        where = " AND ".join(f"{q(f)} = %s" for f in _IDENTITY_FIELDS)
        cursor = connection.query(
            f"UPDATE {table} SET {assignments}, {q('last_heartbeat')} = LOCALTIMESTAMP(3) WHERE {where}",
            args=(*values, *(row[f] for f in _IDENTITY_FIELDS)),
        )
        found += cursor.rowcount > 0
    return found


class WorkerSchema:
    """The worker tables in one schema, declared on first use."""

    def __init__(self, schema_name: str, connection: dj.Connection) -> None:
        self.schema_name = schema_name
        self.connection = connection
        self._tables: dict[str, Any] | None = None
        self._idle_stretches: bool | None = None

    @property
    def tables(self) -> dict[str, Any]:
        """The table classes by name, declaring schema and tables if needed."""
        if self._tables is None:
            self._tables = self._declare()
        return self._tables

    def _declare(self) -> dict[str, Any]:
        # Upstream's registered_worker has our table's name and another heading: declaring "over" it keeps it,
        # and every row we write fails. Refuse at once, in one line (outside the retry: it is no collision).
        refuse_upstream(self.connection, self.schema_name)

        def declare() -> dict[str, Any]:
            _declare_schema(self.connection, self.schema_name)
            return _define_tables(dj.Schema(self.schema_name, connection=self.connection))

        return declare_with_retry(declare, f"worker schema {self.schema_name}")

    def register(self, identity: dict, settings: dict, state: str, placement: dict | None = None) -> bool:
        """Insert this process's RegisteredWorker row (True once it is there)."""
        self.tables["RegisteredWorker"].insert1(
            dict(
                identity,
                settings=json_safe(settings),
                connection_id=self.connection.connection_id,
                state=state,
                last_heartbeat=datetime.datetime.now(),
                **(placement or {}),
            ),
            skip_duplicates=True,
        )
        return True

    def heartbeat(
        self,
        identity: dict,
        *,
        state: str,
        table: str | None,
        key: dict | None,
        cycles: int,
        jobs_done: int,
        jobs_failed: int,
        window: float | None = None,
    ) -> None:
        """Update this process's RegisteredWorker row with what it is doing now (server clock); the
        heartbeat window is left as it is when `window` is None."""
        row = dict(
            identity,
            state=state,
            current_table=table or "",
            current_key=key,
            cycles=cycles,
            jobs_done=jobs_done,
            jobs_failed=jobs_failed,
            connection_id=self.connection.connection_id,
        )
        if window is not None:
            row["heartbeat_window"] = window
        update_heartbeats(self.connection, self.tables["RegisteredWorker"].full_table_name, [row])

    def log_cycle(self, identity: dict, summary, durations: dict[str, float], *, idle: bool = False) -> dict[str, str]:
        """Insert one WorkerLog row per registered process for the cycle `summary` describes; `idle`: the
        rows open an idle stretch (`update_idle_stretch` extends them). Returns the log_id of each process's row
        that opened a stretch (none when the table predates idle stretches: its cycles are logged one by one)."""
        started = datetime.datetime.fromtimestamp(summary.started)
        if idle and not self.has_idle_stretches():
            idle = False
        rows: list[dict] = []
        for index, (process, counts) in enumerate(summary.processes.items()):
            rows.append(
                dict(
                    log_id=uuid.uuid4().hex,
                    worker_name=identity["worker_name"],
                    host=identity["host"],
                    pid=identity["pid"],
                    cycle=summary.cycle,
                    process=process[:255],
                    log_time=started,
                    jobs_done=counts.done,
                    jobs_failed=counts.failed,
                    lost=counts.lost,
                    duration=durations.get(process, 0.0),
                    recovered=(summary.recovered_stale + summary.recovered_orphaned) if index == 0 else 0,
                    cleared=summary.cleared_errors if index == 0 else 0,
                    idle_cycles=1 if idle else 0,
                    last_time=started if idle else None,
                )
            )
        if rows:
            self.tables["WorkerLog"].insert(_fit(rows, self.tables["WorkerLog"].heading.names))
        return {row["process"]: row["log_id"] for row in rows} if idle else {}

    def has_idle_stretches(self) -> bool:
        """Whether WorkerLog has the idle-stretch columns (a table declared by djsupervisor 0.1.0 has not)."""
        if self._idle_stretches is None:
            self._idle_stretches = "idle_cycles" in self.tables["WorkerLog"].heading.names
            if not self._idle_stretches:
                logger.warning(
                    "{}: WorkerLog predates idle stretches (no idle_cycles column): one row per idle cycle, as before",
                    self.schema_name,
                )
        return self._idle_stretches

    def update_idle_stretch(self, stretch) -> bool:
        """Write an idle stretch's totals (`cycle_log.IdleStretch`) into its WorkerLog rows, in place; False
        when its rows are gone (deleted by hand, or pruned)."""
        q = functools.partial(identifiers.quote, compat.backend(self.connection))
        table = self.tables["WorkerLog"].full_table_name
        assignments = ", ".join(
            f"{q(column)} = %s" for column in ("idle_cycles", "last_time", "duration", "recovered", "cleared")
        )
        found = 0
        for index, (process, log_id) in enumerate(stretch.log_ids.items()):
            first = index == 0  # recovery counts go on the first row, as for a busy cycle
            values = (
                stretch.cycles,
                datetime.datetime.fromtimestamp(stretch.last_started),
                stretch.durations.get(process, 0.0),
                stretch.recovered if first else 0,
                stretch.cleared if first else 0,
            )
            cursor = self.connection.query(
                f"UPDATE {table} SET {assignments} WHERE {q('log_id')} = %s", args=(*values, log_id)
            )
            found += cursor.rowcount > 0
        return found == len(stretch.log_ids)

    def log_error(
        self,
        identity: dict,
        *,
        kind: str,
        process: str,
        key: dict | None,
        message: str,
        stack: str | None,
        when: datetime.datetime | None = None,
    ) -> None:
        """Insert an ErrorLog row."""
        self.tables["ErrorLog"].insert1(
            dict(
                error_id=uuid.uuid4().hex,
                worker_name=identity["worker_name"],
                host=identity["host"],
                pid=identity["pid"],
                error_time=when or datetime.datetime.now(),
                kind=kind,
                process=process[:255],
                key=json_safe(key),
                error_message=(message or "")[:2047],
                error_stack=stack,
            )
        )
