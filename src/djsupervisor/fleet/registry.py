"""The fleet in the database: who runs where (RegisteredWorker) and the drain/halt flags (FleetFlag).

Everything here talks to the database and runs in the command line (`status --fleet`, `drain`, `resume`)
or in a supervisor's fleet agent child, never in the supervisor's parent process.

A flag selects pools by host, supervisor and worker name, each a name or ``*`` for any. A pool obeys the
flags of its own worker schema that match it; ``halt`` outranks ``drain``. `resume` removes the flags its
selector covers (a flag is covered when each of its fields equals the resume's or the resume's is ``*``).

Flags are written with statements of our own, values passed as parameters: DataJoint 2.3 restricts by a
dict by writing each string into the SQL with its backslashes doubled (MySQL's escaping), which on
PostgreSQL is another string, so a flag whose selector held a backslash could be set but never changed or
cleared. ``set_by`` and ``set_at`` are the database's: its ``CURRENT_USER`` (the account that wrote the
flag, which the client cannot claim to be someone else) and its clock.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable

import datajoint as dj

from djsupervisor.worker import compat, identifiers
from djsupervisor.worker.schema import WorkerSchema

ANY = "*"
MODES = ("drain", "halt")
#: RegisteredWorker states of a process that is gone on purpose (never overdue).
FINISHED_STATES = ("stopped", "exited")


@dataclasses.dataclass(frozen=True)
class Selector:
    """Which pools a flag (or a resume) applies to: each field a name or ``*``."""

    host: str = ANY
    supervisor: str = ANY
    worker_name: str = ANY

    def matches(self, host: str, supervisor: str, worker_name: str) -> bool:
        """Whether pool `worker_name` of supervisor `supervisor` on `host` is selected."""
        return all(
            mine in (ANY, theirs)
            for mine, theirs in ((self.host, host), (self.supervisor, supervisor), (self.worker_name, worker_name))
        )

    def covers(self, other: Selector) -> bool:
        """Whether every pool `other` selects is selected by this one too."""
        return all(mine in (ANY, theirs) for mine, theirs in zip(dataclasses.astuple(self), dataclasses.astuple(other)))

    def describe(self) -> str:
        return f"host={self.host} supervisor={self.supervisor} worker={self.worker_name}"


@dataclasses.dataclass(frozen=True)
class Flag:
    """One FleetFlag row."""

    selector: Selector
    mode: str
    set_by: str = ""
    set_at: datetime.datetime | None = None


def read_flags(schema: WorkerSchema) -> list[Flag]:
    """Every flag in the worker schema."""
    rows = schema.tables["FleetFlag"].to_dicts()
    return [
        Flag(Selector(r["host"], r["supervisor"], r["worker_name"]), r["mode"], r["set_by"], r["set_at"]) for r in rows
    ]


def flag_for(flags: Iterable[Flag], host: str, supervisor: str, worker_name: str) -> str | None:
    """The mode that applies to a pool: ``"halt"`` if a halt flag matches, else ``"drain"`` if a drain flag
    does, else None."""
    modes = {flag.mode for flag in flags if flag.selector.matches(host, supervisor, worker_name)}
    return next((mode for mode in ("halt", "drain") if mode in modes), None)


_KEY = ("host", "supervisor", "worker_name")
_STAMP = ("mode", "set_by", "set_at")


def set_flag(schema: WorkerSchema, selector: Selector, mode: str) -> Flag:
    """Set (or change the mode of) the flag for `selector`, stamped with the database's user and clock."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    connection = schema.connection
    backend = compat.backend(connection)
    table = schema.tables["FleetFlag"].full_table_name
    key, stamp = ([identifiers.quote(backend, c) for c in names] for names in (_KEY, _STAMP))
    if backend == "postgresql":
        upsert = f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in stamp)
    else:
        upsert = "ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = VALUES({c})" for c in stamp)
    values = "%s, %s, %s, %s, CURRENT_USER, LOCALTIMESTAMP(3)"  # set_by, set_at: the server's
    connection.query(
        f"INSERT INTO {table} ({', '.join(key + stamp)}) VALUES ({values}) {upsert}",
        (selector.host, selector.supervisor, selector.worker_name, mode),
    )
    # (MySQL's collations may match another spelling of the key, "Node1" for "node1": that row was updated)
    return next((flag for flag in read_flags(schema) if flag.selector == selector), Flag(selector, mode))


def clear_flags(schema: WorkerSchema, selector: Selector) -> list[Flag]:
    """Remove the flags `selector` covers; returns them."""
    connection = schema.connection
    backend = compat.backend(connection)
    table = schema.tables["FleetFlag"].full_table_name
    where = " AND ".join(f"{identifiers.quote(backend, c)} = %s" for c in _KEY)
    removed = [flag for flag in read_flags(schema) if selector.covers(flag.selector)]
    for flag in removed:
        connection.query(f"DELETE FROM {table} WHERE {where}", dataclasses.astuple(flag.selector))
    return removed


def server_now(connection: dj.Connection) -> datetime.datetime:
    """The database server's clock, as RegisteredWorker's heartbeats are stamped."""
    return connection.query("SELECT LOCALTIMESTAMP(3)").fetchone()[0]


def fleet_rows(schema: WorkerSchema) -> list[dict]:
    """Every RegisteredWorker row, oldest host first, with ``age`` (seconds since the last heartbeat, by
    the server's clock) and ``overdue`` (alive by its state, but its next heartbeat is late)."""
    now = server_now(schema.connection)
    rows = schema.tables["RegisteredWorker"].to_dicts(order_by=("host", "supervisor", "worker_name", "slot", "pid"))
    for row in rows:
        age = (now - row["last_heartbeat"]).total_seconds()
        window = float(row.get("heartbeat_window") or 0.0)
        row["age"] = round(age, 3)
        row["overdue"] = row["state"] not in FINISHED_STATES and window > 0 and age > window
        row.pop("settings", None)
    return rows
