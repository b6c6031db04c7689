"""The job a supervised child died in: settled by the child that replaces it, with the supervisor's reason.

The supervisor sees how a child died (killed by SIGKILL, its RSS; killed for running past `job_timeout`;
killed at the end of a graceful stop) and which job it was running, but does no database work itself. It
hands that to the slot's next child (or to a recovery run), which settles the job here before its first
cycle, so the count and the final error message say what happened ("the worker process died 3 times
running this job (last: killed by SIGKILL, RSS 3.1 GiB)") rather than the generic "its process was gone"
that job recovery would give it.

The job may already be settled: a sibling's recovery can get to the orphan first. Then the incident is
already counted (`djsupervisor.worker.attempts`), and only its reason is replaced by this better one, in the
JobAttempt row, or in the job's error message if that sibling gave up on the job.

A job killed by a graceful stop that ran past `graceful_timeout` (kind ``stopped``) is not the job's fault:
it goes back to pending at once and is not counted.
"""

from __future__ import annotations

import platform
import re
from typing import Any

import datajoint as dj

from djsupervisor.worker import compat, identifiers
from djsupervisor.worker.attempts import GAVE_UP, AttemptBook, Failure, give_up_message
from djsupervisor.worker.settle import JobQueue, Settled, settle

_GAVE_UP_COUNT = re.compile(re.escape(GAVE_UP) + r"(\d+) attempt")


def job_queue(connection: dj.Connection, table: str, key_columns: tuple[str, ...]) -> JobQueue:
    """The job queue of auto-populated table `table` (a full name, quoted or not), checked to be DataJoint's."""
    backend = compat.backend(connection)
    schema, name = identifiers.split_full_name(table)
    if not all(identifiers.is_column_name(c) for c in key_columns):
        raise identifiers.UnsafeIdentifier(f"not DataJoint attribute names: {sorted(key_columns)!r}")
    full_name = identifiers.full_name(backend, schema, compat.job_table_name(name))
    return JobQueue(connection, full_name, key_columns, identifiers.full_name(backend, schema, name))


def settle_dead_job(connection: dj.Connection, job: dict[str, Any], book: AttemptBook | None) -> str:
    """Settle the job a dead child held; returns what was done, in a few words (for the log).

    `job`: ``table`` (full name), ``key``, ``pid`` (the dead child), ``kind`` (``died``, ``timeout`` or
    ``stopped``) and ``reason`` (one line). The dead child ran on this host (DataJoint's reservations name
    it by `platform.node`)."""
    host = platform.node()
    key = dict(job["key"])
    queue = job_queue(connection, job["table"], tuple(key))
    row = _read(queue, key)
    if row is None:
        return "no longer queued"
    status, holder_host, pid, connection_id, message, key = row
    incident = f"{host}:{job['pid']}"
    if status == "reserved" and holder_host == host and pid == job["pid"]:
        holder = [(holder_host, pid, connection_id)]
        if job["kind"] == "stopped":
            settled = settle(queue, "reserved", [Failure(key, incident, "stopped", job["reason"])], holder, None)
            return "re-pended (not counted: stopped by the supervisor)" if settled.repended else "already settled"
        settled = settle(
            queue, "reserved", [Failure(key, incident, job["kind"], job["reason"], detailed=True)], holder, book
        )
        if settled.repended or settled.given_up:
            return _said(settled)
        # another process settled it between our read and our update (a sibling's recovery): see how
        row = _read(queue, key)
        if row is None:
            return "no longer queued"
        status, _, _, _, message, key = row
    if book is None or job["kind"] == "stopped":
        return "already settled"
    if status == "error" and (match := _GAVE_UP_COUNT.match(message or "")):
        # a sibling's recovery gave up on it with the generic reason: say what really happened
        q = queue.q
        where = " AND ".join(f"{q(c)}=%s" for c in key)
        better = give_up_message(job["kind"], int(match[1]), job["reason"])
        connection.query(
            f"UPDATE {queue.full_name} SET {q('error_message')}=%s WHERE {q('status')}='error' AND {where}",
            args=(better, *key.values()),
        )
        book.forget(queue.target, [key])  # a count our own update may have made again after the give-up
        return "given up (reason completed)"
    last = book.last(queue.target, key)
    if last is not None and last[1] == incident:
        book.count(queue.target, [Failure(key, incident, job["kind"], job["reason"], detailed=True)])
        return "already re-pended (reason completed)"
    return "already settled"


def _read(queue: JobQueue, key: dict) -> tuple | None:
    """(status, host, pid, connection_id, error_message, key as the database gives it) of `key`'s job."""
    q = queue.q
    row = queue.connection.query(
        f"SELECT {q('status')}, {q('host')}, {q('pid')}, {q('connection_id')}, {q('error_message')}, "
        f"{', '.join(map(q, key))} FROM {queue.full_name} WHERE {' AND '.join(f'{q(c)}=%s' for c in key)}",
        args=tuple(key.values()),
    ).fetchone()
    if row is None:
        return None
    status, host, pid, connection_id, message, *values = row
    return status, host, pid, connection_id, message, dict(zip(key, values))  # hashed alike by every process


def _said(settled: Settled) -> str:
    if settled.given_up:
        return "given up after max_attempts"
    return "re-pended after a delay" if settled.repended else "already settled"
