"""Helpers to put real job-table rows in known states: reservations held by real live or dead sessions."""

from __future__ import annotations

import platform
import subprocess

import datajoint as dj
from helpers import wait_until

from djsupervisor.worker.connection import live_connection_ids


def open_connection(db, **overrides) -> dj.Connection:
    """A new, separate session to the test's server."""
    settings = dict(db.settings, **overrides)
    return dj.Connection(
        settings["host"], settings["user"], settings["password"], settings["port"], use_tls=False, backend=db.backend
    )


def dead_connection_id(db) -> int:
    """The id of a real session that was opened and closed (and the server no longer lists)."""
    connection = open_connection(db)
    connection_id = connection.connection_id
    connection.close()
    wait_until(lambda: connection_id not in live_connection_ids(db.connection), 10, message="session to end")
    return connection_id


def dead_pid() -> int:
    """The pid of a real process that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def set_reservation(
    table, key: dict, *, host: str, pid: int, connection_id: int, hours_ago: float, user: str | None = None
) -> None:
    """Make `key`'s job of auto-populated `table` a reservation held by (host, pid, connection_id)."""
    jobs = table.jobs
    jobs.refresh()
    connection = jobs.connection
    q = connection.adapter.quote_identifier
    where = " AND ".join(f"{q(k)}=%s" for k in key)
    interval = connection.adapter.interval_expr(int(hours_ago * 3600), "second")
    cursor = connection.query(
        f"UPDATE {jobs.full_table_name} SET {q('status')}='reserved', {q('host')}=%s, {q('pid')}=%s, "
        f"{q('connection_id')}=%s, {q('user')}=%s, {q('reserved_time')}=CURRENT_TIMESTAMP(3) - {interval} "
        f"WHERE {where}",
        args=(host, pid, connection_id, user or connection.get_user(), *key.values()),
    )
    assert cursor.rowcount == 1


def orphan_reservation(db, table, key: dict) -> None:
    """Make `key`'s job of `table` an orphan: reserved just now on this host by a dead pid on a closed session."""
    set_reservation(table, key, host=THIS_HOST, pid=dead_pid(), connection_id=dead_connection_id(db), hours_ago=0)


def job_status(table, key: dict) -> str:
    """The status of `key`'s job (or 'none')."""
    rows = (table.jobs & key).to_dicts()
    return rows[0]["status"] if rows else "none"


THIS_HOST = platform.node()
