"""One refresh of a table's job queue per interval across the whole fleet, not one per worker per cycle.

``populate()`` starts by refreshing the job queue: key_source minus target minus the queued keys, then the
inserts. On a real pipeline the key source is a join over large tables and the refresh costs seconds; N
workers on M hosts each did it every cycle, N times the work for the same answer. Before a cycle's first
``populate()`` of a table a worker now takes the table's refresh lease: a row of the worker schema's
RefreshLease table, claimed by one compare-and-set UPDATE (or the INSERT that creates it) when the last
refresh is older than the interval, by the database server's clock. The worker that gets it refreshes; the
others work the queue as it stands. Nothing is locked while the refresh runs (the claim is one statement),
and a refresher that crashes mid-refresh delays the next one by one interval at most.

The interval is the worker's `refresh_interval`, by default its `sleep_duration`: a fleet discovers new keys
as soon as one worker would, for the price of one refresh. 0 refreshes every cycle, as DataJoint does.
"""

from __future__ import annotations

import os
import platform

import datajoint as dj

from djsupervisor.worker import compat, identifiers


def take_refresh_lease(connection: dj.Connection, lease_table: str, target: str, interval: float) -> bool:
    """Whether this process should refresh the job queue of `target` (a full table name) now: True once per
    `interval` seconds across every process sharing `lease_table` (RefreshLease's quoted full name)."""
    if interval <= 0:
        return True
    backend = compat.backend(connection)

    def q(name: str) -> str:
        return identifiers.quote(backend, name)

    holder = f"{platform.node()}:{os.getpid()}"[:255]
    older = f"CURRENT_TIMESTAMP(3) - {compat.interval_sql_unit(connection, int(interval * 1e6), 'microsecond')}"
    claimed = connection.query(
        f"UPDATE {lease_table} SET {q('refreshed_at')}=CURRENT_TIMESTAMP(3), {q('refreshed_by')}=%s "
        f"WHERE {q('table_name')}=%s AND {q('refreshed_at')} <= {older}",
        args=(holder, target),
    )
    if claimed.rowcount == 1:
        return True
    columns = f"({q('table_name')}, {q('refreshed_at')}, {q('refreshed_by')}) VALUES (%s, CURRENT_TIMESTAMP(3), %s)"
    if backend == "postgresql":
        sql = f"INSERT INTO {lease_table} {columns} ON CONFLICT ({q('table_name')}) DO NOTHING"
    else:
        sql = f"INSERT IGNORE INTO {lease_table} {columns}"
    return connection.query(sql, args=(target, holder)).rowcount == 1  # the first refresh of this table ever
