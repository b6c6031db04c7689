"""One refresh of a table's job queue per interval across the whole fleet, not one per worker per cycle.

``populate()`` starts by refreshing the job queue: key_source minus target minus the queued keys, then the
inserts. On a real pipeline the key source is a join over large tables and the refresh costs seconds; N
workers on M hosts each did it every cycle, N times the work for the same answer. Before a cycle's first
``populate()`` of a table a worker now takes the table's refresh lease: a row of the worker schema's
RefreshLease table, claimed by one compare-and-set UPDATE (or the INSERT that creates it) when the last
refresh is older than the interval, by the database server's clock. The worker that gets it refreshes; the
others work the queue as it stands. Nothing is locked while the refresh runs (the claim is one statement).

The claim stamps the lease `HOLD_SECONDS` ahead, and the refresher stamps it with the time it finished
(`end_refresh`, once the refresh's last new jobs are written): the interval runs from the end of a refresh,
and no second worker refreshes while one is at it. A claim stamped with its start only had let another
worker refresh one interval later while the first was still writing: each found the same unwritten keys and
wrote them again (30,000 new keys, 4 workers, `sleep_duration` 0.1 s: three refreshes of the same keys, and
figure 1's throughput with 4 workers 0.82 of plain loops). A refresher that crashes holds the lease
`HOLD_SECONDS` at most, then the next worker refreshes; one slower than that shares it with a second.

The interval is the worker's `refresh_interval`, by default its `sleep_duration`: a fleet discovers new keys
as soon as one worker would, for the price of one refresh. 0 refreshes every cycle, as DataJoint does.
"""

from __future__ import annotations

import functools
import os
import platform

import datajoint as dj

from djsupervisor.worker import compat, identifiers

#: Seconds a claimed lease stays with its refresher until `end_refresh`: the longest a refresh may take (the
#: key-source query, the new jobs written: 100k keys take ~10 s here) before a second worker may start one,
#: and the longest a crashed refresher delays the next refresh.
HOLD_SECONDS = 60.0


def _holder() -> str:
    return f"{platform.node()}:{os.getpid()}"[:255]


def take_refresh_lease(
    connection: dj.Connection, lease_table: str, target: str, interval: float, hold: float = HOLD_SECONDS
) -> bool:
    """Whether this process should refresh the job queue of `target` (a full table name) now: True once per
    `interval` seconds after the last refresh ended, across every process sharing `lease_table` (RefreshLease's
    quoted full name). A True holds the lease for `hold` seconds or until `end_refresh`."""
    if interval <= 0:
        return True
    backend = compat.backend(connection)
    q = functools.partial(identifiers.quote, backend)

    def stamp(seconds: float) -> str:
        shift = compat.interval_sql_unit(connection, int(abs(seconds) * 1e6), "microsecond")
        return f"CURRENT_TIMESTAMP(3) {'+' if seconds >= 0 else '-'} {shift}"

    claimed = connection.query(
        f"UPDATE {lease_table} SET {q('refreshed_at')}={stamp(hold)}, {q('refreshed_by')}=%s "
        f"WHERE {q('table_name')}=%s AND {q('refreshed_at')} <= {stamp(-interval)}",
        args=(_holder(), target),
    )
    if claimed.rowcount == 1:
        return True
    columns = f"({q('table_name')}, {q('refreshed_at')}, {q('refreshed_by')}) VALUES (%s, {stamp(hold)}, %s)"
    if backend == "postgresql":
        sql = f"INSERT INTO {lease_table} {columns} ON CONFLICT ({q('table_name')}) DO NOTHING"
    else:
        sql = f"INSERT IGNORE INTO {lease_table} {columns}"
    return connection.query(sql, args=(target, _holder())).rowcount == 1  # the first refresh of this table ever


def end_refresh(connection: dj.Connection, lease_table: str, target: str) -> None:
    """This process's refresh of `target`'s job queue is done (its new jobs written): the next one is due one
    interval from now. Nothing changes if the lease went to another process meanwhile (held too long)."""
    q = functools.partial(identifiers.quote, compat.backend(connection))
    connection.query(
        f"UPDATE {lease_table} SET {q('refreshed_at')}=CURRENT_TIMESTAMP(3) "
        f"WHERE {q('table_name')}=%s AND {q('refreshed_by')}=%s",
        args=(target, _holder()),
    )
