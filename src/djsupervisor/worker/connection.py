"""Fork-safe DataJoint connections and the server's view of which connections are alive.

DataJoint records `connection.connection_id` on every job it reserves, and stale-job detection compares
that id with the server's live sessions, so the id must always be the one of the session in use. DataJoint
sets it once, in `Connection.__init__`; `connect()` and automatic reconnects leave it stale. The functions
here keep it right (through `djsupervisor.worker.compat`, which holds every DataJoint internal they touch).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import datajoint as dj
from loguru import logger

from djsupervisor.worker import compat
from djsupervisor.worker.compat import session_alive as session_alive  # the command line's `check` asks here

# Inherited driver connections a child abandoned. Kept referenced so that no destructor ever runs on them:
# psycopg2's would send a Terminate message on the socket it shares with the parent.
_abandoned: list[Any] = []


def refresh_connection_id(connection: dj.Connection) -> int:
    """Set `connection.connection_id` to the id of the session it is using now, and return it."""
    connection.connection_id = compat.session_id(connection)
    return connection.connection_id


def keep_connection_id_current(connection: dj.Connection) -> None:
    """Make every later (re)connect of `connection`, automatic ones included, refresh its connection_id."""
    compat.call_after_every_connect(connection, functools.partial(refresh_connection_id, connection))


def distinct_connections(*candidates: dj.Connection | None) -> list[dj.Connection]:
    """The connections among `candidates`, each once (by identity), in order; None left out."""
    found: dict[int, dj.Connection] = {}
    for connection in candidates:
        if connection is not None:
            found.setdefault(id(connection), connection)
    return list(found.values())


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
    raw = compat.driver_connection(connection)
    if raw is not None:
        fd = compat.driver_socket_fd(raw)
        if fd is not None and fd >= 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(devnull, fd)
            finally:
                os.close(devnull)
        _abandoned.append(raw)
    compat.forget_session(connection)
    keep_connection_id_current(connection)
    connection.connect()
    logger.debug("reconnected after fork: connection id {}", connection.connection_id)
    return connection


def drop_password_variable() -> None:
    """Remove DJ_PASS from this process's environment, once connected.

    DataJoint read it when imported and keeps the password in `dj.config` (reconnects use that), so nothing
    here needs it any more; left there, every subprocess a `make()` starts (a shell, a MATLAB or a Slurm
    command) would inherit the database password, and `/proc/PID/environ` of each would show it. A supervised
    child, `djsupervisor run` and a hand-run `DataJointWorker.run()` all call this once connected.
    """
    os.environ.pop("DJ_PASS", None)


#: MySQL client error codes that mean the server cannot be reached or the session is gone.
_MYSQL_CONNECTION_ERRORS = {2002, 2003, 2005, 2006, 2013, 2055}


def is_connection_error(error: BaseException) -> bool:
    """Whether `error` says the database server is unreachable or the session was lost (not a bad query)."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        error = current
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
        current = error.__cause__ or error.__context__
    return False


def live_connection_ids(connection: dj.Connection) -> set[int]:
    """Ids of the sessions the server reports as alive (those this user may see, on MySQL)."""
    if compat.backend(connection) == "postgresql":
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
    if compat.backend(connection) == "postgresql":
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
    if compat.backend(connection) != "mysql" or key in _noted_servers:
        return
    _noted_servers.add(key)
    version = connection.query("SELECT @@version").fetchone()[0]
    if "MariaDB" in version:
        logger.debug("server {} is MariaDB {}: DataJoint 2.x supports it on a best-effort basis", key, version)
