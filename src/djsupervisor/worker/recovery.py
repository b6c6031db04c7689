"""Recovery and cleanup of DataJoint 2.x job queues (the hidden ``~~table`` of each auto-populated table).

Three rules, applied to the job tables a worker is scoped to: by default only the queues of the tables it
populates itself; every job table in the schemas starting with its `db_prefix` only when asked for
(``recovery_scope="db_prefix"``). Recovery never lists the whole server: on a server shared between labs,
another lab's reservations and errors are theirs to handle.

* **stale**: a reservation older than `stale_timeout_hours` whose `connection_id` is no longer alive on the
  server goes back to pending;
* **orphan**: a reservation made on this host by a pid that no longer exists and whose connection is gone
  goes back to pending at once, whatever its age (how a supervisor recovers a crashed child's job); so
  does one made by this very process on a session it has since lost (the database went away mid-job):
  recovery runs between jobs, so this process is not working on it;
* **transient errors**: error jobs whose message matches a pattern (SQL LIKE, case-insensitive) of the
  worker's `autoclear_error_patterns` or of `TRANSIENT_ERROR_PATTERNS` go back to pending, after being
  copied to the worker's ErrorLog. Other errors stay.

The job tables are found by `djsupervisor.worker.job_tables`, which keeps only names DataJoint would have
made; every name is quoted by `identifiers` (never by DataJoint's adapter, which does not escape quotes
inside a name).

On MySQL/MariaDB a user without the PROCESS privilege sees only its own account's sessions; reservations of
other accounts are then skipped (with one warning) rather than judged dead.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence

import datajoint as dj
import psutil
from loguru import logger

from djsupervisor.worker import compat, identifiers
from djsupervisor.worker.connection import is_connection_error, live_connection_ids, sees_all_connections, user_name
from djsupervisor.worker.job_tables import SYSTEM_SCHEMAS, JobTable, list_job_tables

#: Error messages (SQL LIKE, matched case-insensitively) of failures that are worth retrying: the job did
#: nothing wrong, the database or the process around it did. Every built-in pattern of datajoint-utilities'
#: worker (its `_clean_up`) is here or matched by a broader one, so a lab moving over keeps what it cleared.
TRANSIENT_ERROR_PATTERNS: tuple[str, ...] = (
    "%deadlock%",  # MySQL 1213 "Deadlock found", PostgreSQL "deadlock detected"
    "%lock wait timeout%",  # MySQL 1205
    "%InternalError: (1205%",  # datajoint-utilities': MySQL 1205 as pymysql's InternalError reports it
    "%could not serialize access%",  # PostgreSQL serialization failure
    "%lost connection%",  # MySQL 2013 "Lost connection to MySQL server"
    "%connection lost%",  # DataJoint's LostConnectionError
    "%LostConnectionError%",  # datajoint-utilities': the exception's name in a "Class: message" error
    "%connection was lost%",  # DataJoint: "Connection was lost during a transaction."
    "%server has gone away%",  # MySQL 2006
    "%server closed the connection unexpectedly%",  # PostgreSQL
    "%connection already closed%",  # psycopg2
    "%MaxRetryError%",  # urllib3 gave up on an HTTP request (object stores, web APIs a make() calls)
    "%SIGTERM%",  # DataJoint's own SIGTERM handler aborted the job ("SystemExit: SIGTERM received")
    "%KeyboardInterrupt%",  # Ctrl+C or SIGINT during make()
)

#: Seconds a `JobRecovery` trusts its list of job tables before reading the catalog again. Listing reads
#: information_schema.columns, the dearest query of an idle cycle on a server with many tables; a table
#: that appears in scope is seen within this time (at once if the caller names it, see `JobRecovery.run`).
RELIST_SECONDS = 60.0
_PROBE_BATCH = 50  # job tables per candidate-count statement
_CLEAR_BATCH = 200  # error jobs re-pended per UPDATE


@dataclasses.dataclass
class RecoveryCounts:
    """Jobs returned to pending by one pass of recovery and cleanup."""

    stale: int = 0
    orphaned: int = 0
    cleared: int = 0


#: Called for each cleared error before it is re-pended: (target table's full name, key, message, stack,
#: error time).
ClearedErrorSink = Callable[[str, dict, str, str, "datetime.datetime | None"], None]


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.AccessDenied:
        return True


def _decode_stack(value) -> str:
    """The error stack of a job row as text (DataJoint stores it as a `<blob>`)."""
    if value is None:
        return ""
    if isinstance(value, memoryview):
        value = value.tobytes()
    if isinstance(value, (bytes, bytearray)):
        try:
            return str(compat.unpack_blob(bytes(value)))
        except Exception:
            return bytes(value).decode("utf-8", "replace")
    return str(value)


class JobRecovery:
    """Recovery and cleanup of job tables for one worker (keeps what it learns about the server)."""

    def __init__(
        self,
        connection: dj.Connection,
        *,
        tables: Iterable[tuple[str, str]] = (),
        db_prefix: Sequence[str] | None = None,
        stale_timeout_hours: float = 24,
        autoclear_error_patterns: Iterable[str] = (),
        on_cleared_error: ClearedErrorSink | None = None,
        relist_seconds: float = RELIST_SECONDS,
    ) -> None:
        self.connection = connection
        self.tables = frozenset(tables)  # (schema, job table) pairs in scope by name
        self.db_prefix = tuple(db_prefix) if db_prefix else None  # whole schemas in scope (explicitly asked)
        self.stale_timeout_hours = stale_timeout_hours
        self.error_patterns = tuple(dict.fromkeys([*autoclear_error_patterns, *TRANSIENT_ERROR_PATTERNS]))
        self.on_cleared_error = on_cleared_error
        self.host = platform.node()
        self.relist_seconds = relist_seconds
        self._sees_all: bool | None = None
        self._user: str | None = None
        self._warned_unprivileged = False
        self._tables: list[JobTable] | None = None
        self._listed_at = 0.0
        self._missing: set[tuple[str, str]] = set()  # named by the caller, absent from the last listing

    def _q(self, name: str) -> str:
        return identifiers.quote(compat.backend(self.connection), name)

    def _full_name(self, table: JobTable) -> str:
        return identifiers.full_name(compat.backend(self.connection), table.schema, table.name)

    def _pending_assignments(self) -> str:
        q = self._q
        return (
            f"{q('status')}='pending', {q('reserved_time')}=NULL, {q('completed_time')}=NULL, "
            f"{q('error_message')}='', {q('error_stack')}=NULL, {q('host')}='', {q('pid')}=0, "
            f"{q('connection_id')}=0, {q('user')}=''"
        )

    def _in_scope(self, pair: tuple[str, str]) -> bool:
        schema = pair[0]
        return pair in self.tables or (
            self.db_prefix is not None and schema not in SYSTEM_SCHEMAS and any(map(schema.startswith, self.db_prefix))
        )

    def job_tables(self, known: Iterable[tuple[str, str]] = ()) -> list[JobTable]:
        """The job tables in scope: listed again when the list is `relist_seconds` old, or when `known`
        names a (schema, job table) in scope that the list lacks (a table declared since)."""
        listed = {(t.schema, t.name) for t in self._tables or ()}
        new = {k for k in known if self._in_scope(k)} - listed - self._missing
        if self._tables is None or new or time.monotonic() - self._listed_at >= self.relist_seconds:
            self._tables = list_job_tables(self.connection, self.db_prefix, tables=self.tables)
            self._listed_at = time.monotonic()
            listed = {(t.schema, t.name) for t in self._tables}
            self._missing = {k for k in known if self._in_scope(k)} - listed
        return self._tables

    def forget_tables(self) -> None:
        """Drop the list of job tables: the next pass reads the catalog again."""
        self._tables = None

    def run(self, known_tables: Iterable[tuple[str, str]] = ()) -> RecoveryCounts:
        """One pass over every job table in scope; returns how many jobs went back to pending.

        `known_tables` are (schema, job table name) pairs the caller knows exist (its own queues): the
        cached list of job tables is read again at once if it lacks one of them.
        """
        counts = RecoveryCounts()
        live: set[int] | None = None
        try:
            for table in self._tables_with_candidates(self.job_tables(known_tables)):
                reserved, errors = self._candidates(table)
                if reserved:
                    if live is None:
                        live = live_connection_ids(self.connection)
                    stale, orphaned = self._recover_reservations(table, reserved, live)
                    counts.stale += stale
                    counts.orphaned += orphaned
                if errors:
                    counts.cleared += self._clear_errors(table, errors)
        except Exception as error:
            if not is_connection_error(error):
                self.forget_tables()  # a table dropped since the listing, most likely
            raise
        if counts.stale or counts.orphaned or counts.cleared:
            logger.info(
                "job recovery: {} stale and {} orphaned reservations re-pended, {} transient errors cleared",
                counts.stale,
                counts.orphaned,
                counts.cleared,
            )
        return counts

    def _candidate_condition(self) -> str:
        q = self._q
        like = " OR ".join(f"LOWER({q('error_message')}) LIKE LOWER(%s)" for _ in self.error_patterns)
        return f"{q('status')}='reserved' OR ({q('status')}='error' AND ({like}))"

    def _tables_with_candidates(self, tables: list[JobTable]) -> list[JobTable]:
        """The tables holding a reservation or a clearable error: one counting statement per
        `_PROBE_BATCH` tables (an idle cycle over many job tables costs one statement, not one each)."""
        if len(tables) <= 1:
            return tables
        found = []
        for start in range(0, len(tables), _PROBE_BATCH):
            batch = tables[start : start + _PROBE_BATCH]
            sql = " UNION ALL ".join(
                f"SELECT {i} AS t, COUNT(*) AS n FROM {self._full_name(table)} WHERE {self._candidate_condition()}"
                for i, table in enumerate(batch)
            )
            rows = self.connection.query(sql, args=self.error_patterns * len(batch)).fetchall()
            found += [batch[int(i)] for i, n in rows if n]
        return found

    def _candidates(self, table: JobTable) -> tuple[list[dict], list[dict]]:
        """Reserved jobs (holder and age) and error jobs whose message matches a clearing pattern."""
        q = self._q
        interval = compat.interval_sql(self.connection, int(self.stale_timeout_hours * 3600))
        keys = "".join(f", {q(c)}" for c in table.key_columns)
        stack = q("error_stack") if self.on_cleared_error is not None else "NULL"
        rows = self.connection.query(
            f"SELECT {q('status')}, {q('host')}, {q('pid')}, {q('connection_id')}, {q('user')}, "
            f"CASE WHEN {q('reserved_time')} < CURRENT_TIMESTAMP(3) - {interval} THEN 1 ELSE 0 END, "
            f"{q('error_message')}, {q('completed_time')}, {stack}{keys} FROM {self._full_name(table)} "
            f"WHERE {self._candidate_condition()}",
            args=self.error_patterns,
        ).fetchall()
        reserved: list[dict] = []
        errors: list[dict] = []
        for status, host, pid, conn_id, user, old, message, completed, stack, *key_values in rows:
            row = dict(
                host=host,
                pid=pid,
                connection_id=conn_id,
                user=user,
                old=bool(old),
                message=message,
                completed=completed,
                stack=stack,
                key=dict(zip(table.key_columns, key_values)),
            )
            (reserved if status == "reserved" else errors).append(row)
        return reserved, errors

    def _judgeable(self, rows: list[dict]) -> list[dict]:
        """The reservations whose connection this session can see the liveness of."""
        if self._sees_all is None:
            self._sees_all = sees_all_connections(self.connection)
            self._user = user_name(self.connection)
        if self._sees_all:
            return rows
        mine = [r for r in rows if (r["user"] or "").split("@")[0] == self._user]
        if len(mine) < len(rows) and not self._warned_unprivileged:
            self._warned_unprivileged = True
            logger.warning(
                "database user {!r} cannot see other users' connections (no PROCESS privilege): "
                "reservations made by other users are left alone by stale-job recovery",
                self._user,
            )
        return mine

    def _recover_reservations(self, table: JobTable, rows: list[dict], live: set[int]) -> tuple[int, int]:
        q = self._q
        holders: dict[tuple, bool] = {}  # (host, pid, connection_id) -> any of its reservations is old
        for row in self._judgeable(rows):
            if row["connection_id"] in live:
                continue
            holder = (row["host"], row["pid"], row["connection_id"])
            holders[holder] = holders.get(holder, False) or row["old"]
        stale = orphaned = 0
        interval = compat.interval_sql(self.connection, int(self.stale_timeout_hours * 3600))
        where_holder = f"{q('status')}='reserved' AND {q('host')}=%s AND {q('pid')}=%s AND {q('connection_id')}=%s"
        for (host, pid, conn_id), any_old in holders.items():
            if host == self.host and (pid == os.getpid() or not _pid_alive(pid)):
                cursor = self.connection.query(
                    f"UPDATE {self._full_name(table)} SET {self._pending_assignments()} WHERE {where_holder}",
                    args=(host, pid, conn_id),
                )
                orphaned += cursor.rowcount
            elif any_old:
                cursor = self.connection.query(
                    f"UPDATE {self._full_name(table)} SET {self._pending_assignments()} WHERE {where_holder} "
                    f"AND {q('reserved_time')} < CURRENT_TIMESTAMP(3) - {interval}",
                    args=(host, pid, conn_id),
                )
                stale += cursor.rowcount
        return stale, orphaned

    def target_full_name(self, table: JobTable) -> str:
        """Quoted full name of the auto-populated table that `table` queues jobs for."""
        found = self.connection.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema=%s AND table_name IN (%s, %s)",
            args=(table.schema, *table.target_candidates),
        ).fetchall()
        name = min((r[0] for r in found), key=len, default=table.target_candidates[0])
        return identifiers.full_name(compat.backend(self.connection), table.schema, name)

    def _clear_errors(self, table: JobTable, rows: list[dict]) -> int:
        """Copy each error to the sink, then re-pend them, `_CLEAR_BATCH` keys per statement."""
        q = self._q
        if self.on_cleared_error is not None:
            target = self.target_full_name(table)
            for row in rows:
                self.on_cleared_error(target, row["key"], row["message"], _decode_stack(row["stack"]), row["completed"])
        one_key = "(" + " AND ".join(f"{q(c)}=%s" for c in table.key_columns) + ")"
        cleared = 0
        for start in range(0, len(rows), _CLEAR_BATCH):
            batch = rows[start : start + _CLEAR_BATCH]
            cursor = self.connection.query(
                f"UPDATE {self._full_name(table)} SET {self._pending_assignments()} "
                f"WHERE {q('status')}='error' AND ({' OR '.join([one_key] * len(batch))})",
                args=tuple(value for row in batch for value in row["key"].values()),
            )
            cleared += cursor.rowcount
        return cleared


def recover_jobs(
    connection: dj.Connection,
    *,
    tables: Iterable[tuple[str, str]] = (),
    db_prefix: Sequence[str] | None = None,
    stale_timeout_hours: float = 24,
    autoclear_error_patterns: Iterable[str] = (),
) -> RecoveryCounts:
    """One pass of stale/orphan recovery and transient-error clearing (see the module docstring) over the
    job tables named in `tables` and, if given, every job table of the schemas starting with `db_prefix`."""
    return JobRecovery(
        connection,
        tables=tables,
        db_prefix=db_prefix,
        stale_timeout_hours=stale_timeout_hours,
        autoclear_error_patterns=autoclear_error_patterns,
    ).run()


def record_job_error(connection: dj.Connection, table_full_name: str, key: dict, message: str) -> bool:
    """Mark the reserved job `key` of auto-populated table `table_full_name` as an error with `message`.

    `table_full_name` is the target table's quoted full name (as DataJoint's `full_table_name` gives it).
    Used by the supervisor when it killed a job that ran past its `job_timeout`. Returns True if a
    reservation was turned into an error (False if the job was no longer reserved).
    """
    backend = compat.backend(connection)
    schema, name = identifiers.split_full_name(table_full_name)
    if not all(identifiers.is_column_name(k) for k in key):
        raise identifiers.UnsafeIdentifier(f"not DataJoint attribute names: {sorted(key)!r}")

    def q(name: str) -> str:
        return identifiers.quote(backend, name)

    job_table = identifiers.full_name(backend, schema, compat.job_table_name(name))
    message = message[:2047]
    where = " AND ".join(f"{q(k)}=%s" for k in key)
    cursor = connection.query(
        f"UPDATE {job_table} SET {q('status')}='error', {q('error_message')}=%s, "
        f"{q('completed_time')}=CURRENT_TIMESTAMP(3) WHERE {q('status')}='reserved' AND {where}",
        args=(message, *key.values()),
    )
    return cursor.rowcount == 1
