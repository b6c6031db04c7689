"""Retention: the worker tables are pruned of rows older than `log_retention_days`, by one process at a time.

Without it the worker tables grow for ever: ErrorLog was never pruned and RegisteredWorker kept a row per
process (700 rows after a restart storm). datajoint-utilities' `delete_old_logs` kept 30 days; so does the
default here. WorkerLog is kept small at the source too (idle stretches, see `djsupervisor.worker.cycle_log`).

Who prunes: a supervisor's fleet agent, every few minutes, for its pools' worker schemas; a worker run by
hand (no supervisor), for its own worker schema, at most once an hour. Many of them share one schema, so a
pass first takes a database lock named after the schema (MySQL ``GET_LOCK(name, 0)``, PostgreSQL
``pg_try_advisory_lock(hashtext(name))``), without waiting: whoever finds it taken skips this pass, the
holder is doing the work. The lock is a session lock, not a row lock: it blocks no writer, and the server
drops it if the pruner's session dies.

How: in batches of `BATCH_SIZE` rows, each its own autocommitted statement (``DELETE ... LIMIT`` on MySQL,
a ``ctid`` subselect on PostgreSQL, which has no ``DELETE ... LIMIT``), so no statement holds row locks for
long (1,000 rows: a few milliseconds) and a worker's insert never waits behind a prune. A pass stops after
`MAX_BATCHES` batches per table; a backlog (the first pass over a year of rows) is worked off over the next
passes rather than in one long one.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from collections.abc import Sequence
from typing import Any

import datajoint as dj

from djsupervisor.worker import compat, identifiers

BATCH_SIZE = 1000  # rows per DELETE
MAX_BATCHES = 100  # per table and pass: at most 100,000 rows, then the lock goes back
_MYSQL_LOCK_NAME_MAX = 64  # MySQL refuses longer GET_LOCK names


@dataclasses.dataclass
class PruneResult:
    """What one pruning pass did.

    `skipped` is True when another process held the lock (nothing was deleted); `batches` maps each table's
    full name to the rows each of its DELETE statements removed, in order.
    """

    skipped: bool = False
    batches: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def deleted(self, table: str) -> int:
        """Rows deleted from `table` (its full name)."""
        return sum(self.batches.get(table, []))

    @property
    def total(self) -> int:
        """Rows deleted from every table."""
        return sum(sum(rows) for rows in self.batches.values())


def lock_name(schema_name: str) -> str:
    """The database lock that one pruner of worker schema `schema_name` holds (at most 64 characters)."""
    name = f"djsupervisor.prune.{schema_name}"
    if len(name) > _MYSQL_LOCK_NAME_MAX:  # schema names may be 64 characters themselves
        name = "djsupervisor.prune." + hashlib.sha1(schema_name.encode()).hexdigest()[:40]
    return name


def _try_lock_mysql(connection: dj.Connection, name: str) -> bool:
    return connection.query("SELECT GET_LOCK(%s, 0)", args=(name,)).fetchone()[0] == 1


def _release_lock_mysql(connection: dj.Connection, name: str) -> None:
    connection.query("SELECT RELEASE_LOCK(%s)", args=(name,))


def _try_lock_postgresql(connection: dj.Connection, name: str) -> bool:
    return bool(connection.query("SELECT pg_try_advisory_lock(hashtext(%s))", args=(name,)).fetchone()[0])


def _release_lock_postgresql(connection: dj.Connection, name: str) -> None:
    connection.query("SELECT pg_advisory_unlock(hashtext(%s))", args=(name,))


def try_lock(connection: dj.Connection, name: str) -> bool:
    """Take the session lock `name` if it is free, without waiting; True when this session holds it now."""
    if compat.backend(connection) == "postgresql":
        return _try_lock_postgresql(connection, name)
    return _try_lock_mysql(connection, name)


def release_lock(connection: dj.Connection, name: str) -> None:
    """Release the session lock `name` taken with `try_lock`."""
    if compat.backend(connection) == "postgresql":
        _release_lock_postgresql(connection, name)
    else:
        _release_lock_mysql(connection, name)


def delete_in_batches(
    connection: dj.Connection,
    table: str,
    where: str,
    args: Sequence[Any],
    *,
    batch_size: int = BATCH_SIZE,
    max_batches: int = MAX_BATCHES,
) -> list[int]:
    """Delete the rows of `table` (a quoted full name) that match `where`, `batch_size` rows per statement,
    until none is left or `max_batches` statements ran; returns the rows each statement deleted."""
    if compat.backend(connection) == "postgresql":
        sql = f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} WHERE {where} LIMIT {int(batch_size)})"
    else:
        sql = f"DELETE FROM {table} WHERE {where} LIMIT {int(batch_size)}"
    batches: list[int] = []
    while len(batches) < max_batches:
        deleted = connection.query(sql, args=tuple(args)).rowcount
        batches.append(deleted)
        if deleted < batch_size:
            break
    return batches


def server_now(connection: dj.Connection) -> datetime.datetime:
    """The database server's clock (in the session's zone), as RegisteredWorker's heartbeats are stamped."""
    return connection.query("SELECT LOCALTIMESTAMP(3)").fetchone()[0]


def prune(
    schema: Any,
    retention_days: float,
    *,
    batch_size: int = BATCH_SIZE,
    max_batches: int = MAX_BATCHES,
) -> PruneResult:
    """Prune worker schema `schema` (a `WorkerSchema`) of what is older than `retention_days`, under its lock.

    WorkerLog rows logged, ErrorLog rows raised and JobAttempt rows last counted before the cutoff;
    RegisteredWorker rows whose last heartbeat is before it. A process that is still there heartbeats at
    least once a cycle, every few seconds while a job runs, and before each sleep; a row unstamped for the
    whole retention is a process gone (stopped, exited, or overdue by days), whatever its state says.
    """
    connection = schema.connection
    name = lock_name(schema.schema_name)
    if not try_lock(connection, name):
        return PruneResult(skipped=True)
    try:
        tables = schema.tables
        cutoff = server_now(connection) - datetime.timedelta(days=retention_days)
        result = PruneResult()
        for table, column in (
            ("WorkerLog", "log_time"),
            ("ErrorLog", "error_time"),
            ("RegisteredWorker", "last_heartbeat"),
            ("JobAttempt", "last_time"),  # attempts at jobs that have since succeeded (given-up ones go at once)
        ):
            full_name = tables[table].full_table_name
            quoted = identifiers.quote(compat.backend(connection), column)
            result.batches[full_name] = delete_in_batches(
                connection, full_name, f"{quoted} < %s", (cutoff,), batch_size=batch_size, max_batches=max_batches
            )
        return result
    finally:
        release_lock(connection, name)


def forget_host(schema: Any, host: str) -> int:
    """Delete every RegisteredWorker row of `host` from worker schema `schema`; returns how many went."""
    table = schema.tables["RegisteredWorker"]
    return sum(
        delete_in_batches(
            schema.connection,
            table.full_table_name,
            f"{identifiers.quote(compat.backend(schema.connection), 'host')} = %s",
            (host,),
            max_batches=10**6,  # a host's rows: a few hundred at most; the batches only keep each statement short
        )
    )
