"""RegisteredWorker, WorkerLog and ErrorLog under datajoint-utilities' names, with its classmethods.

Why module-level classes: a lab's worker module imports them beside DataJointWorker and uses them as tables
(``ErrorLog & key``, ``WorkerLog.to_dicts()``) and through their classmethods inside its callables
(``ErrorLog.log_exception(key, func, error)``). datajoint-utilities' constructor decorates these classes with
its worker schema, so the last worker made wins. Here they are bound on first use instead, to the schema of the
worker in a cycle now or else of the last one made: importing a lab's module (a supervisor's parent does) opens
no connection, and a callable logs under the name of the worker that runs it.

The tables are the ones a worker declares (`djsupervisor.worker.schema`); their definitions are written there
only, and these classes, which carry none, read their heading from the database. Their columns are
djsupervisor's, not datajoint-utilities'; MIGRATING.md maps one onto the other. Rows are written through the
worker's own `WorkerSchema`, so a row logged here looks like one the loop logged.
"""

from __future__ import annotations

import datetime
import sys
import time
import traceback
import warnings
from collections.abc import Mapping
from typing import Any

import datajoint as dj

from djsupervisor.dj_worker.key_source import get_incomplete_key_source_sql, get_key_source_count, get_workers_progress
from djsupervisor.worker import compat, identifiers
from djsupervisor.worker.events import CycleSummary, ProcessCounts
from djsupervisor.worker.steps import callable_name

__all__ = [
    "ErrorLog",
    "RegisteredWorker",
    "WorkerLog",
    "get_incomplete_key_source_sql",
    "get_key_source_count",
    "get_workers_progress",
    "is_djparttable",
    "is_djtable",
]


class _Context:
    """The workers the module-level tables speak for: the one in a cycle now, else the last one made."""

    created: Any = None  # djsupervisor.dj_worker.worker.DataJointWorker
    running: Any = None


context = _Context()


def current_worker() -> Any:
    """The worker whose schema the tables are bound to now (DataJointError before any worker is made)."""
    worker = context.running or context.created
    if worker is None:
        raise dj.DataJointError(
            "the worker tables (RegisteredWorker, WorkerLog, ErrorLog) are bound once a DataJointWorker is made: "
            "make one first"
        )
    return worker


def _bind(cls: Any, required: bool = True) -> None:
    """Bind table class `cls` to the current worker's schema, declaring the worker tables there if needed."""
    if cls._binding or (not required and context.running is None and context.created is None):
        return
    worker = current_worker()
    bound = cls._bound_to
    if bound is not None and bound[0] == worker.worker_schema_name and bound[1] is worker.connection:
        return
    worker.schema.tables  # noqa: B018 -- declares the tables (with their definitions) before the class reads them
    schema = dj.Schema(worker.worker_schema_name, connection=worker.connection, create_tables=False)
    cls._binding = True  # DataJoint's decoration reads attributes that would bind again
    try:
        schema(cls, context={})
    finally:
        cls._binding = False
    cls._bound_to = (worker.worker_schema_name, worker.connection)


#: Class attributes that need the table bound first (instantiating the class, which every query does, too).
_BOUND_ATTRIBUTES = frozenset({"connection", "full_table_name", "database"})


class _WorkerTableMeta(compat.TableClassMeta):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        _bind(cls)
        return super().__call__(*args, **kwargs)

    def __getattribute__(cls, name: str) -> Any:
        if name in _BOUND_ATTRIBUTES:
            _bind(cls, required=False)
        return super().__getattribute__(name)


def process_label(process: Any) -> str:
    """How djsupervisor names a process in its logs: a table's full name, a callable's module.qualname."""
    if isinstance(process, str):
        return process
    if compat.is_user_table(process):
        return process.full_table_name
    return callable_name(process)


def error_text(error: Any) -> tuple[str, str | None]:
    """(message, stack) of an exception as ErrorLog keeps them (``ValueError: bad``); a string is the message."""
    if isinstance(error, BaseException):
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return message, "".join(traceback.format_exception(error))
    return str(error), traceback.format_exc() if sys.exc_info()[0] is not None else None


def check_number(name: str, value: Any) -> float:
    """`value` if it is a number (not a bool); else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return value


def _sql_time(moment: datetime.datetime) -> str:
    """A timestamp literal; the worker tables hold the writing host's local time, so `moment` is local too."""
    return moment.isoformat(sep=" ", timespec="milliseconds")


def _minutes_since(backend: str, column_sql: str, now: datetime.datetime) -> str:
    if backend == "postgresql":
        return f"CAST(FLOOR(EXTRACT(EPOCH FROM (TIMESTAMP '{_sql_time(now)}' - {column_sql})) / 60) AS INTEGER)"
    return f"TIMESTAMPDIFF(MINUTE, {column_sql}, '{_sql_time(now)}')"


def _delete_older_than(table: Any, column: str, cutoff_days: Any) -> int:
    cutoff = datetime.datetime.now() - datetime.timedelta(days=check_number("cutoff_days", cutoff_days))
    return (table & f"{column} < '{_sql_time(cutoff)}'").delete_quick(get_count=True)


class RegisteredWorker(dj.Manual, metaclass=_WorkerTableMeta):
    """One row per worker process: its settings (registered processes, key sources), state and heartbeat."""

    _bound_to: tuple | None = None
    _binding = False

    @classmethod
    def get_workers_progress(cls, worker_name: str | None = None, process_name: str | None = None) -> Any:
        """Deprecated in datajoint-utilities too: `get_workers_progress(RegisteredWorker, connection)`."""
        warnings.warn(
            "RegisteredWorker.get_workers_progress() is deprecated; use get_workers_progress(RegisteredWorker, "
            "connection)",
            DeprecationWarning,
            stacklevel=2,
        )
        return get_workers_progress(cls, cls.connection, worker_name, process_name)


class WorkerLog(dj.Manual, metaclass=_WorkerTableMeta):
    """One row per registered process and cycle of each worker process (djsupervisor's columns)."""

    _bound_to: tuple | None = None
    _binding = False

    @classmethod
    def log_process_job(cls, process: Any, worker_name: str = "", db_prefix: Any = ("",)) -> None:
        """Log that `process` runs now: a row of cycle 0 with no counts (`db_prefix` is accepted and unused:
        processes are named as djsupervisor names them, see `process_label`)."""
        worker = current_worker()
        identity = worker.process_identity()
        if worker_name:
            identity = dict(identity, worker_name=worker_name)
        summary = CycleSummary(cycle=0, started=time.time())
        summary.processes[process_label(process)] = ProcessCounts(
            "table" if compat.is_user_table(process) else "callable"
        )
        worker.schema.log_cycle(identity, summary, {})

    @classmethod
    def get_recent_jobs(cls, backtrack_minutes: float = 60) -> Any:
        """Per process logged in the last `backtrack_minutes`: worker_count (distinct pids),
        minutes_since_oldest and minutes_since_newest (a query: ``.to_pandas()``, ``.to_dicts()``).

        An idle stretch's row counts from its first cycle (``log_time``) to its last (``last_time``)."""
        now = datetime.datetime.now()
        since = now - datetime.timedelta(minutes=check_number("backtrack_minutes", backtrack_minutes))
        backend = compat.backend(cls.connection)
        last = "COALESCE(last_time, log_time)"
        return dj.U("process").aggr(
            cls & f"{last} > '{_sql_time(since)}'",
            worker_count="count(DISTINCT pid)",
            minutes_since_oldest=_minutes_since(backend, "MIN(log_time)", now),
            minutes_since_newest=_minutes_since(backend, f"MAX({last})", now),
        )

    @classmethod
    def delete_old_logs(cls, cutoff_days: float = 30) -> int:
        """Delete the rows logged more than `cutoff_days` days ago; returns how many went."""
        return _delete_older_than(cls, "log_time", cutoff_days)


class ErrorLog(dj.Manual, metaclass=_WorkerTableMeta):
    """Every failed job or callable, every exception a lab logged, every error cleared for retry."""

    _bound_to: tuple | None = None
    _binding = False

    @classmethod
    def log_exception(cls, key: Any, process: Any, error: Any) -> None:
        """Log `error` (an exception, or its text) raised by `process` for `key`: one new row each time
        (kind ``exception``), under the name of the worker running now."""
        worker = current_worker()
        message, stack = error_text(error)
        worker.schema.log_error(
            worker.process_identity(),
            kind="exception",
            process=process_label(process),
            key=dict(key) if isinstance(key, Mapping) else key,  # any other value is kept as JSON, as upstream
            message=message,
            stack=stack,
        )

    @classmethod
    def log_error_job(cls, error_entry: Mapping, schema_name: str, db_prefix: Any = ("",)) -> None:
        """Log an error job (kind ``job``): datajoint-utilities' job row (``table_name``, ``key``,
        ``timestamp``...) or a DataJoint 2.x job-table row with its key columns and a ``table_name`` added."""
        entry = dict(error_entry)
        if not entry.get("table_name"):
            raise ValueError(
                "ErrorLog.log_error_job: error_entry needs a 'table_name' (the job's table, as in the schema)"
            )
        worker = current_worker()
        backend = compat.backend(worker.connection)
        schema = schema_name.strip('`"')
        process = identifiers.full_name(backend, schema, entry["table_name"].strip('`"'))
        key = entry.get("key")
        if not isinstance(key, Mapping):
            others = {"table_name", "key_hash", "key", "timestamp"} | compat.JOB_TABLE_COLUMNS
            key = {k: v for k, v in entry.items() if k not in others}
        identity = dict(worker.process_identity())
        identity.update({k: entry[k] for k in ("host", "pid") if entry.get(k)})
        stack = entry.get("error_stack")
        worker.schema.log_error(
            identity,
            kind="job",
            process=process,
            key=dict(key),
            message=str(entry.get("error_message") or ""),
            stack=stack if stack is None or isinstance(stack, str) else str(stack),
            when=entry.get("timestamp") or entry.get("completed_time"),
        )

    @classmethod
    def delete_old_logs(cls, cutoff_days: float = 30) -> int:
        """Delete the errors logged more than `cutoff_days` days ago; returns how many went."""
        return _delete_older_than(cls, "error_time", cutoff_days)


def is_djtable(obj: Any, base_class: type | None = None) -> bool:
    """Whether `obj` is a DataJoint user table class or instance (of `base_class`, when given)."""
    return compat.is_user_table(obj, base_class)


def is_djparttable(obj: Any) -> bool:
    """Whether `obj` is a DataJoint part table class or instance."""
    return compat.is_user_table(obj, dj.Part)
