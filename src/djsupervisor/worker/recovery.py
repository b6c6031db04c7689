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

Each of these is a failed attempt at the job, counted in the worker schema's JobAttempt table when the
worker gives an `AttemptBook` (`djsupervisor.worker.attempts`): the job goes back to pending after a
growing delay, and after `max_attempts` it becomes an error that says why and that no rule clears again
(`djsupervisor.worker.settle`).

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
from djsupervisor.worker.attempts import GAVE_UP, AttemptBook, Failure
from djsupervisor.worker.connection import is_connection_error, live_connection_ids, sees_all_connections, user_name
from djsupervisor.worker.job_tables import SYSTEM_SCHEMAS, JobTable, list_job_tables
from djsupervisor.worker.settle import JobQueue, settle

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
    given_up: int = 0  # jobs that reached max_attempts and became errors


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


def _first_line(message: str | None, limit: int = 500) -> str:
    """The first line of an error message, cut to `limit` characters."""
    lines = (message or "").strip().splitlines()
    return lines[0][:limit] if lines else "(no message)"


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
        attempts: AttemptBook | None = None,
    ) -> None:
        self.connection = connection
        self.tables = frozenset(tables)  # (schema, job table) pairs in scope by name
        self.db_prefix = tuple(db_prefix) if db_prefix else None  # whole schemas in scope (explicitly asked)
        self.stale_timeout_hours = stale_timeout_hours
        self.error_patterns = tuple(dict.fromkeys([*autoclear_error_patterns, *TRANSIENT_ERROR_PATTERNS]))
        self.on_cleared_error = on_cleared_error
        self.host = platform.node()
        self.relist_seconds = relist_seconds
        self.attempts = attempts  # None: nothing counted, every job re-pended at once
        self._queues: dict[tuple[str, str], JobQueue] = {}
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

    def _queue(self, table: JobTable) -> JobQueue:
        """The job queue of `table`, with the quoted name of the table it queues for (read once)."""
        pair = (table.schema, table.name)
        if pair not in self._queues:
            full_name = self._full_name(table)
            self._queues[pair] = JobQueue(self.connection, full_name, table.key_columns, self.target_full_name(table))
        return self._queues[pair]

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
        self._queues.clear()

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
                    self._recover_reservations(table, reserved, live, counts)
                if errors:
                    self._clear_errors(table, errors, counts)
        except Exception as error:
            if not is_connection_error(error):
                self.forget_tables()  # a table dropped since the listing, most likely
            raise
        if counts.stale or counts.orphaned or counts.cleared or counts.given_up:
            logger.info(
                "job recovery: {} stale and {} orphaned reservations re-pended, {} transient errors cleared, "
                "{} jobs given up after max_attempts",
                counts.stale,
                counts.orphaned,
                counts.cleared,
                counts.given_up,
            )
        return counts

    def _candidate_condition(self) -> str:
        q = self._q
        like = " OR ".join(f"LOWER({q('error_message')}) LIKE LOWER(%s)" for _ in self.error_patterns)
        given_up = f"{q('error_message')} NOT LIKE '{GAVE_UP}%%'"  # never cleared again, whatever it says
        return f"{q('status')}='reserved' OR ({q('status')}='error' AND {given_up} AND ({like}))"

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
            f"SELECT {q('status')}, {q('host')}, {q('pid')}, {q('connection_id')}, {q('user')}, {q('reserved_time')}, "
            f"CASE WHEN {q('reserved_time')} < CURRENT_TIMESTAMP(3) - {interval} THEN 1 ELSE 0 END, "
            f"{q('error_message')}, {q('completed_time')}, {stack}{keys} FROM {self._full_name(table)} "
            f"WHERE {self._candidate_condition()}",
            args=self.error_patterns,
        ).fetchall()
        reserved: list[dict] = []
        errors: list[dict] = []
        for status, host, pid, conn_id, user, reserved_time, old, message, completed, stack, *key_values in rows:
            row = dict(
                host=host,
                pid=pid,
                connection_id=conn_id,
                user=user,
                reserved_time=reserved_time,
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

    def _recover_reservations(self, table: JobTable, rows: list[dict], live: set[int], counts: RecoveryCounts) -> None:
        """Settle the reservations whose connection is gone: orphans (holder process gone from this host, or
        this process's own lost session) at once, others once older than `stale_timeout_hours`."""
        orphans: list[dict] = []
        stale: list[dict] = []
        for row in self._judgeable(rows):
            if row["connection_id"] in live:
                continue
            if row["host"] == self.host and (row["pid"] == os.getpid() or not _pid_alive(row["pid"])):
                orphans.append(row)
            elif row["old"]:
                stale.append(row)
        queue = self._queue(table)
        for found, kind in ((orphans, "died"), (stale, "stale")):
            if not found:
                continue
            failures = [self._reservation_failure(row, kind) for row in found]
            holders = [(row["host"], row["pid"], row["connection_id"]) for row in found]
            settled = settle(queue, "reserved", failures, holders, self.attempts)
            counts.given_up += settled.given_up
            if kind == "died":
                counts.orphaned += settled.repended
            else:
                counts.stale += settled.repended

    def _reservation_failure(self, row: dict, kind: str) -> Failure:
        if kind == "died":
            reason = f"its process (pid {row['pid']} on {row['host']}) was gone"
        else:
            reason = f"connection {row['connection_id']} of {row['host']} gone for over {self.stale_timeout_hours:g} h"
        return Failure(row["key"], f"{row['host']}:{row['pid']}", kind, reason)

    def target_full_name(self, table: JobTable) -> str:
        """Quoted full name of the auto-populated table that `table` queues jobs for."""
        found = self.connection.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema=%s AND table_name IN (%s, %s)",
            args=(table.schema, *table.target_candidates),
        ).fetchall()
        name = min((r[0] for r in found), key=len, default=table.target_candidates[0])
        return identifiers.full_name(compat.backend(self.connection), table.schema, name)

    def _clear_errors(self, table: JobTable, rows: list[dict], counts: RecoveryCounts) -> None:
        """Copy each error to the sink, then settle them (re-pended, or given up after max_attempts)."""
        queue = self._queue(table)
        if self.on_cleared_error is not None:
            for row in rows:
                sink = self.on_cleared_error
                sink(queue.target, row["key"], row["message"], compat.decode_stack(row["stack"]), row["completed"])
        failures = [
            Failure(row["key"], f"error:{row['completed']}", "transient", _first_line(row["message"])) for row in rows
        ]
        settled = settle(queue, "error", failures, [()] * len(rows), self.attempts)
        counts.cleared += settled.repended
        counts.given_up += settled.given_up


def recover_jobs(
    connection: dj.Connection,
    *,
    tables: Iterable[tuple[str, str]] = (),
    db_prefix: Sequence[str] | None = None,
    stale_timeout_hours: float = 24,
    autoclear_error_patterns: Iterable[str] = (),
    attempts: AttemptBook | None = None,
) -> RecoveryCounts:
    """One pass of stale/orphan recovery and transient-error clearing (see the module docstring) over the
    job tables named in `tables` and, if given, every job table of the schemas starting with `db_prefix`;
    failures counted in `attempts` if given."""
    return JobRecovery(
        connection,
        tables=tables,
        db_prefix=db_prefix,
        stale_timeout_hours=stale_timeout_hours,
        autoclear_error_patterns=autoclear_error_patterns,
        attempts=attempts,
    ).run()
