"""Settling failed jobs in a DataJoint 2.x job table: back to pending after a delay, or given up as an error.

Job recovery (`djsupervisor.worker.recovery`) and the child that replaces a dead one
(`djsupervisor.worker.dead_jobs`) both end here: the failures are counted in the `AttemptBook`, each job
under `max_attempts` goes back to pending with DataJoint's `scheduled_time` pushed back by the retry delay,
and each one that reached it becomes an ``error`` whose message says why (and its count is deleted).

Every UPDATE is guarded by the state the failure was seen in (``reserved`` by the same holder, or
``error`` and not given up): of several processes settling one failure, one changes the job and the others
find nothing to change. Re-pends are batched, `_BATCH` jobs per statement, as a storm of transient errors
(a database restart) can leave hundreds at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import datajoint as dj

from djsupervisor.worker import compat, identifiers
from djsupervisor.worker.attempts import GAVE_UP, AttemptBook, Failure, give_up_message

_BATCH = 200

#: The holder columns that guard the settling of a reservation (a later holder's is not ours to settle).
HOLDER = ("host", "pid", "connection_id")


@dataclasses.dataclass
class Settled:
    """How many jobs went back to pending, and how many were given up on."""

    repended: int = 0
    given_up: int = 0


@dataclasses.dataclass(frozen=True)
class JobQueue:
    """One job table: its quoted name, its key columns, and the quoted name of the table it queues for."""

    connection: dj.Connection
    full_name: str
    key_columns: tuple[str, ...]
    target: str

    def q(self, name: str) -> str:
        return identifiers.quote(compat.backend(self.connection), name)

    def pending_assignments(self, delay: float) -> str:
        """SET clause of a re-pend: a pending job, free of its last holder, runnable after `delay` seconds."""
        q = self.q
        when = "CURRENT_TIMESTAMP(3)"
        if delay > 0:
            when += f" + {compat.interval_sql(self.connection, math.ceil(delay))}"
        return (
            f"{q('status')}='pending', {q('reserved_time')}=NULL, {q('completed_time')}=NULL, "
            f"{q('error_message')}='', {q('error_stack')}=NULL, {q('host')}='', {q('pid')}=0, "
            f"{q('connection_id')}=0, {q('user')}='', {q('scheduled_time')}={when}"
        )

    def guard(self, status: str) -> str:
        """WHERE clause of the state a failure was seen in (the `guard_values` of each job follow as terms)."""
        q = self.q
        if status == "error":
            return f"{q('status')}='error' AND {q('error_message')} NOT LIKE '{GAVE_UP}%%'"
        return f"{q('status')}='reserved'"

    def terms(self, columns: Sequence[str], count: int) -> str:
        return identifiers.key_terms(self.q, columns, count)


def settle(
    queue: JobQueue,
    status: str,
    failures: Sequence[Failure],
    guard_values: Sequence[tuple],
    book: AttemptBook | None,
) -> Settled:
    """Count `failures` (jobs seen in `status`: ``reserved`` or ``error``) and re-pend or give up each.

    `guard_values[i]` are the values of `HOLDER` the i-th job was reserved by (empty for errors). Without a
    `book` nothing is counted and every job goes back to pending at once (the behaviour before attempts)."""
    settled = Settled()
    if not failures:
        return settled
    attempts = book.count(queue.target, failures) if book is not None else [1] * len(failures)
    guard_columns = HOLDER if status == "reserved" else ()
    by_delay: dict[float, list[int]] = {}
    given_up: list[int] = []
    for i, n in enumerate(attempts):
        if book is not None and n >= book.max_attempts:
            given_up.append(i)
        else:
            by_delay.setdefault(book.delay(n) if book is not None else 0.0, []).append(i)
    columns = (*queue.key_columns, *guard_columns)
    for delay, indices in by_delay.items():
        for start in range(0, len(indices), _BATCH):
            batch = indices[start : start + _BATCH]
            args = tuple(v for i in batch for v in (*failures[i].key.values(), *guard_values[i]))
            cursor = queue.connection.query(
                f"UPDATE {queue.full_name} SET {queue.pending_assignments(delay)} "
                f"WHERE {queue.guard(status)} AND {queue.terms(columns, len(batch))}",
                args=args,
            )
            settled.repended += cursor.rowcount
    for i in given_up:
        failure = failures[i]
        message = give_up_message(failure.kind, attempts[i], failure.reason)
        cursor = queue.connection.query(
            f"UPDATE {queue.full_name} SET {queue.q('status')}='error', {queue.q('error_message')}=%s, "
            f"{queue.q('completed_time')}=CURRENT_TIMESTAMP(3) "
            f"WHERE {queue.guard(status)} AND {queue.terms(columns, 1)}",
            args=(message, *failure.key.values(), *guard_values[i]),
        )
        settled.given_up += cursor.rowcount
    if book is not None and given_up:
        book.forget(queue.target, [failures[i].key for i in given_up])
    return settled
