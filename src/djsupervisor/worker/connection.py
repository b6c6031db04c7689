"""Fork-safe DataJoint connections and the server's view of which connections are alive.

DataJoint records `connection.connection_id` on every job it reserves, and stale-job detection compares
that id with the server's live sessions, so the id must always be the one of the session in use. DataJoint
sets it once, in `Connection.__init__`; `connect()` and automatic reconnects leave it stale. The functions
here keep it right.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import datajoint as dj
from loguru import logger

# Inherited driver connections a child abandoned. Kept referenced so that no destructor ever runs on them:
# psycopg2's would send a Terminate message on the socket it shares with the parent.
_abandoned: list[Any] = []


def _raw_socket_fd(raw: Any) -> int | None:
    """The file descriptor of a driver connection (pymysql or psycopg2), or None if unknown/closed."""
    try:
        if hasattr(raw, "fileno"):  # psycopg2
            return raw.fileno()
        sock = getattr(raw, "_sock", None)  # pymysql
        return sock.fileno() if sock is not None else None
    except Exception:
        return None


def refresh_connection_id(connection: dj.Connection) -> int:
    """Set `connection.connection_id` to the id of the session it is using now, and return it."""
    connection.connection_id = connection.adapter.get_connection_id(connection._conn)
    return connection.connection_id


def keep_connection_id_current(connection: dj.Connection) -> None:
    """Make every later (re)connect of `connection`, automatic ones included, refresh its connection_id."""
    if getattr(connection.connect, "_djs_refreshes_id", False):
        return
    original = connection.connect

    @functools.wraps(original)
    def connect_and_refresh() -> None:
        original()
        refresh_connection_id(connection)

    connect_and_refresh._djs_refreshes_id = True
    connection.connect = connect_and_refresh


def reconnect_after_fork(connection: dj.Connection | None = None) -> dj.Connection:
    """Give a freshly forked child its own session on the same `Connection` object.

    The inherited driver connection is abandoned without a byte sent on its socket (its descriptor is
    pointed at /dev/null, so even a destructor writing a goodbye cannot reach the parent's session), then
    the same `Connection` reconnects, so every table already imported uses the child's own session, and
    `connection_id` is refreshed, now and on every later reconnect. Defaults to DataJoint's global
    connection (`dj.conn()`).
    """
    if connection is None:
        connection = dj.conn()
    raw = connection._conn
    if raw is not None:
        fd = _raw_socket_fd(raw)
        if fd is not None and fd >= 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(devnull, fd)
            finally:
                os.close(devnull)
        _abandoned.append(raw)
    connection._conn = None
    connection._in_transaction = False
    keep_connection_id_current(connection)
    connection.connect()
    logger.debug("reconnected after fork: connection id {}", connection.connection_id)
    return connection


#: MySQL client error codes that mean the server cannot be reached or the session is gone.
_MYSQL_CONNECTION_ERRORS = {2002, 2003, 2005, 2006, 2013, 2055}


def is_connection_error(error: BaseException) -> bool:
    """Whether `error` says the database server is unreachable or the session was lost (not a bad query)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (dj.errors.LostConnectionError, ConnectionError, TimeoutError)):
            return True
        module = type(error).__module__ or ""
        if module.startswith("pymysql") and type(error).__name__ in ("OperationalError", "InterfaceError"):
            code = error.args[0] if error.args else None
            if code in _MYSQL_CONNECTION_ERRORS or type(error).__name__ == "InterfaceError":
                return True
        if module.startswith("psycopg2") and type(error).__name__ in ("OperationalError", "InterfaceError"):
            return True
        error = error.__cause__ or error.__context__
    return False


def session_alive(connection: dj.Connection) -> bool:
    """Whether `connection`'s session answers a ping. (DataJoint's `is_connected` cannot tell on PostgreSQL:
    that adapter's ping returns False instead of raising, which `is_connected` takes for success.)"""
    if connection._conn is None:
        return False
    try:
        return connection.adapter.ping(connection._conn) is not False
    except Exception:
        return False


def live_connection_ids(connection: dj.Connection) -> set[int]:
    """Ids of the sessions the server reports as alive (those this user may see, on MySQL)."""
    if connection.adapter.backend == "postgresql":
        rows = connection.query("SELECT pid FROM pg_stat_activity").fetchall()
    else:
        rows = connection.query("SELECT ID FROM information_schema.PROCESSLIST").fetchall()
    return {int(r[0]) for r in rows}


def sees_all_connections(connection: dj.Connection) -> bool:
    """Whether this session can see other users' sessions.

    PostgreSQL's `pg_stat_activity` lists every backend's pid to anyone. MySQL/MariaDB show other accounts'
    threads only with the PROCESS privilege (or SUPER, or ALL PRIVILEGES on *.*). Privileges held only
    through a role are not seen here; such a user is treated as unprivileged (safe: nothing is re-pended
    wrongly, foreign reservations are just left to their owners).
    """
    if connection.adapter.backend == "postgresql":
        return True
    for (grant,) in connection.query("SHOW GRANTS").fetchall():
        head = grant.upper().split(" TO ")[0]
        if " ON *.*" in head and ("ALL PRIVILEGES" in head or "PROCESS" in head or "SUPER" in head):
            return True
    return False


def user_name(connection: dj.Connection) -> str:
    """The account name of this session, without the client host (as DataJoint records it, before '@')."""
    return connection.get_user().split("@")[0]


_noted_servers: set[str] = set()


def note_server(connection: dj.Connection) -> None:
    """Log, once per server and at debug level, that a MariaDB server is best-effort in DataJoint 2.x."""
    key = f"{connection.conn_info['host']}:{connection.conn_info['port']}"
    if connection.adapter.backend != "mysql" or key in _noted_servers:
        return
    _noted_servers.add(key)
    version = connection.query("SELECT @@version").fetchone()[0]
    if "MariaDB" in version:
        logger.debug("server {} is MariaDB {}: DataJoint 2.x supports it on a best-effort basis", key, version)
