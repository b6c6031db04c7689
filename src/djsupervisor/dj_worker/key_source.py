"""How far each registered table is: datajoint-utilities' progress functions, on djsupervisor's worker tables.

A dashboard process usually has not imported the lab's pipeline, so it cannot ask a table class for its key
source. Each worker therefore registers, with every table it populates, the SQL of that table's key source
(`djsupervisor.worker.steps.TableStep.describe`, in RegisteredWorker's `settings`), as datajoint-utilities
registers it in its RegisteredWorker.Process; the counts here run that SQL. A custom ``key_source`` is counted
as populate() sees it.

Counts per (worker, table), as datajoint-utilities gives them: ``total`` keys in the key source,
``incomplete`` those not in the table yet, ``reserved``, ``error`` and ``ignore`` jobs in its job table, and
``remaining = incomplete - reserved - error - ignore``. Unknown counts (no key source SQL, a table excluded,
a query that failed) are NaN.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import datajoint as dj
import pandas as pd
from loguru import logger

from djsupervisor.worker import compat, identifiers

#: The columns of a progress frame (its index is ``process``), in datajoint-utilities' order.
PROGRESS_COLUMNS = ("worker_name", "total", "incomplete", "reserved", "error", "ignore", "remaining")
_JOB_STATUSES = ("reserved", "error", "ignore")


@dataclasses.dataclass(frozen=True)
class RegisteredStep:
    """A table one worker populates, as its registration describes it."""

    worker_name: str
    table: str  # quoted full name
    key_source_sql: str | None
    db_prefix: tuple[str, ...]

    @property
    def schema(self) -> str:
        return identifiers.split_full_name(self.table)[0]

    @property
    def class_name(self) -> str:
        """The table's class name (``__square`` → ``Square``)."""
        name = identifiers.split_full_name(self.table)[1].lstrip("_#~")
        return re.sub(r"(?:^|_+)([a-z0-9])", lambda m: m.group(1).upper(), name)

    @property
    def process(self) -> str:
        """datajoint-utilities' name for it: the schema without the worker's db_prefix, and the class name."""
        schema = self.schema
        prefix = max((p for p in self.db_prefix if p and schema.startswith(p)), key=len, default="")
        return f"{schema[len(prefix) :]}.{self.class_name}"


def _with_restrictions(sql: str, restrictions: Iterable[Any], joiner: str) -> str:
    conditions = [f"({r})" for r in restrictions]
    return f"{sql} {joiner} {' AND '.join(conditions)}" if conditions else sql


def get_incomplete_key_source_sql(connection: dj.Connection, key_source_sql: str, target_full_table_name: str) -> str:
    """SQL selecting the keys of `key_source_sql` that target table `target_full_table_name` lacks yet."""
    backend = compat.backend(connection)
    target = identifiers.full_name(backend, *identifiers.split_full_name(target_full_table_name))
    key = dj.FreeTable(connection, target).primary_key
    q = lambda name: identifiers.quote(backend, name)
    matches = " AND ".join(f"t.{q(k)} = ks.{q(k)}" for k in key)
    return f"SELECT * FROM ({key_source_sql}) AS ks WHERE NOT EXISTS (SELECT 1 FROM {target} AS t WHERE {matches})"


def _table_exists(connection: dj.Connection, schema: str, table: str) -> bool:
    rows = connection.query(
        "SELECT 1 FROM information_schema.tables WHERE table_schema=%s AND table_name=%s", args=(schema, table)
    ).fetchall()
    return bool(rows)


def get_key_source_count(
    connection: dj.Connection,
    key_source_sql: str,
    target_full_table_name: str,
    andlist_restriction: Any = None,
    return_sql: bool = False,
) -> tuple[Any, Any]:
    """(total, incomplete) keys of the key source, each restricted by the SQL conditions of
    `andlist_restriction` (a string or a list of them); (NaN, NaN) when the table is missing or a query
    fails. With `return_sql`, the two SELECT statements instead."""
    schema, table = identifiers.split_full_name(target_full_table_name)
    if not _table_exists(connection, schema, table):
        return math.nan, math.nan
    restrictions = [andlist_restriction] if isinstance(andlist_restriction, str) else list(andlist_restriction or ())
    total_sql = _with_restrictions(f"SELECT * FROM ({key_source_sql}) AS ks", restrictions, "WHERE")
    incomplete_sql = _with_restrictions(
        get_incomplete_key_source_sql(connection, key_source_sql, target_full_table_name), restrictions, "AND"
    )
    if return_sql:
        return total_sql, incomplete_sql
    try:
        total, incomplete = (
            connection.query(f"SELECT COUNT(*) FROM ({sql}) AS n").fetchone()[0] for sql in (total_sql, incomplete_sql)
        )
        return total, incomplete
    except Exception as error:
        logger.error(
            "counting the key source of {} failed: {}: {}", target_full_table_name, type(error).__name__, error
        )
        return math.nan, math.nan


def job_counts(connection: dj.Connection, target_full_table_name: str) -> dict[str, int]:
    """Jobs of the table by status (reserved, error, ignore; 0 when it has no job table yet)."""
    backend = compat.backend(connection)
    schema, table = identifiers.split_full_name(target_full_table_name)
    jobs = compat.job_table_name(table)
    counts = dict.fromkeys(_JOB_STATUSES, 0)
    if _table_exists(connection, schema, jobs):
        status = identifiers.quote(backend, "status")
        rows = connection.query(
            f"SELECT {status}, COUNT(*) FROM {identifiers.full_name(backend, schema, jobs)} GROUP BY {status}"
        ).fetchall()
        counts.update({s: int(n) for s, n in rows if s in counts})
    return counts


def registered_steps(table: Any, worker_name: str | None = None) -> list[RegisteredStep]:
    """The tables each worker populates, from its most recent RegisteredWorker row (`table`, a table class
    or instance or FreeTable of RegisteredWorker)."""
    query = table & {"worker_name": worker_name} if worker_name else table
    newest: dict[str, dict] = {}
    for row in query.proj("settings", "last_heartbeat").to_dicts():
        seen = newest.get(row["worker_name"])
        if seen is None or row["last_heartbeat"] > seen["last_heartbeat"]:
            newest[row["worker_name"]] = row
    steps = []
    for name, row in sorted(newest.items()):
        settings = row["settings"] if isinstance(row["settings"], dict) else json.loads(row["settings"])
        prefix = settings.get("db_prefix") or ()
        prefix = (prefix,) if isinstance(prefix, str) else tuple(prefix)
        for process in settings.get("processes", ()):
            if process.get("kind") == "table":
                steps.append(RegisteredStep(name, process["name"], process.get("key_source_sql"), prefix))
    return steps


def progress_frame(connection: dj.Connection, steps: Sequence[RegisteredStep], exclude_tables: Iterable[str] = ()):
    """The progress of each step as a DataFrame indexed by ``process`` (`PROGRESS_COLUMNS`); the key sources
    of tables named in `exclude_tables` (by class name, process name or full name) are not counted."""
    excluded = set(exclude_tables)
    counted: dict[str, tuple[Any, Any, dict[str, int]]] = {}
    records = []
    for step in steps:
        if step.table not in counted:
            skip = not step.key_source_sql or excluded & {step.class_name, step.process, step.table}
            total, incomplete = (
                (math.nan, math.nan)
                if skip
                else get_key_source_count(connection, step.key_source_sql or "", step.table)
            )
            counted[step.table] = (total, incomplete, job_counts(connection, step.table))
        total, incomplete, jobs = counted[step.table]
        remaining = incomplete - jobs["reserved"] - jobs["error"] - jobs["ignore"]
        records.append(
            dict(
                process=step.process,
                worker_name=step.worker_name,
                total=total,
                incomplete=incomplete,
                **jobs,
                remaining=remaining,
            )
        )
    return pd.DataFrame.from_records(records, columns=["process", *PROGRESS_COLUMNS]).set_index("process")


def get_workers_progress(
    registered_worker_table: Any,
    connection: dj.Connection,
    worker_name: str | None = None,
    process_name: str | None = None,
):
    """The progress of every table each registered worker populates (see the module docstring), as a
    DataFrame indexed by ``process``; `worker_name` and `process_name` (``schema.Class`` or the full name)
    keep only those."""
    steps = registered_steps(registered_worker_table, worker_name)
    if process_name:
        steps = [s for s in steps if process_name in (s.process, s.table, s.table.replace("`", "").replace('"', ""))]
    return progress_frame(connection, steps)
