"""The fleet in the database: who runs where (RegisteredWorker) and the drain/halt flags (FleetFlag).

Everything here talks to the database and runs in the command line (`status --fleet`, `drain`, `resume`)
or in a supervisor's fleet agent child, never in the supervisor's parent process.

A flag selects pools by host, supervisor and worker name, each a name or ``*`` for any. A pool obeys the
flags of its own worker schema that match it; ``halt`` outranks ``drain``. `resume` removes the flags its
selector covers (a flag is covered when each of its fields equals the resume's or the resume's is ``*``).
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import platform
from collections.abc import Iterable

import datajoint as dj

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


def set_flag(schema: WorkerSchema, selector: Selector, mode: str) -> Flag:
    """Set (or change the mode of) the flag for `selector`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    flag = Flag(selector, mode, f"{getpass.getuser()}@{platform.node()}"[:255], datetime.datetime.now())
    row = dict(dataclasses.asdict(selector), mode=mode, set_by=flag.set_by, set_at=flag.set_at)
    table = schema.tables["FleetFlag"]
    table.insert1(row, skip_duplicates=True)  # (REPLACE is MySQL's only)
    table.update1(row)
    return flag


def clear_flags(schema: WorkerSchema, selector: Selector) -> list[Flag]:
    """Remove the flags `selector` covers; returns them."""
    table = schema.tables["FleetFlag"]
    removed = [flag for flag in read_flags(schema) if selector.covers(flag.selector)]
    for flag in removed:
        (table & dataclasses.asdict(flag.selector)).delete_quick()
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
