"""The tables a configuration's workers populate, in pipeline order, with their job tables and worker schemas.

Shared by `progress`, `errors` and `retry`. Everything here is read with a handful of statements: the
catalog once for every job table and worker table (`Pipeline.load`), never a fetch of a table's keys.
Statements are run through `Sql`, which counts them: the benchmark and the README quote the count.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any

from djsupervisor.operate import OperateError
from djsupervisor.worker import compat, identifiers
from djsupervisor.worker.job_tables import JobTable, list_job_tables


class Sql:
    """A connection's `query`, counted: `statements` and `seconds` so far."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.backend = compat.backend(connection)
        self.statements = 0
        self.seconds = 0.0

    def q(self, name: str) -> str:
        """`name` quoted for this backend (never by DataJoint's adapter: `identifiers`)."""
        return identifiers.quote(self.backend, name)

    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        started = time.perf_counter()
        try:
            return list(self.connection.query(sql, args=tuple(args)).fetchall())
        finally:
            self.statements += 1
            self.seconds += time.perf_counter() - started

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run a statement that changes rows; returns how many it changed."""
        started = time.perf_counter()
        try:
            return int(self.connection.query(sql, args=tuple(args)).rowcount)
        finally:
            self.statements += 1
            self.seconds += time.perf_counter() - started


@dataclasses.dataclass
class PipelineTable:
    """One auto-populated table some worker populates."""

    table: Any  # the DataJoint table instance, as the worker holds it
    schema: str
    name: str  # unquoted table name (``__square``)
    workers: list[str]  # the worker definitions (pools) that populate it
    worker_schemas: list[str]
    job_table: JobTable | None = None  # None until DataJoint declares it (no job has been queued yet)

    @property
    def full_name(self) -> str:
        """Quoted full name, as DataJoint, job recovery and JobAttempt write it."""
        return identifiers.full_name(compat.backend(self.table.connection), self.schema, self.name)

    @property
    def label(self) -> str:
        """``schema.Class``, how the commands print it."""
        return f"{self.schema}.{type(self.table).__name__}"

    def job_table_sql(self, sql: Sql) -> str | None:
        return identifiers.full_name(sql.backend, self.schema, self.job_table.name) if self.job_table else None

    def names(self) -> set[str]:
        """Every spelling `--table` accepts for it."""
        cls = type(self.table).__name__
        return {cls, self.name, f"{self.schema}.{cls}", f"{self.schema}.{self.name}", self.full_name}


@dataclasses.dataclass
class Pipeline:
    """The tables of a configuration's workers and the worker schemas they write to."""

    sql: Sql
    tables: list[PipelineTable]
    worker_schemas: list[str]  # those that exist on the server
    worker_tables: dict[tuple[str, str], bool]  # (worker schema, table name) -> exists

    @classmethod
    def load(cls, workers: Iterable[tuple[str, Any]]) -> Pipeline:
        """From (pool name, DataJointWorker) pairs: their tables in pipeline order (a table after every
        table it depends on; otherwise in the order the workers run them)."""
        found: dict[tuple[str, str], PipelineTable] = {}
        connection = None
        for pool, worker in workers:
            connection = connection or worker.connection
            for table in worker.tables:
                pair = (table.database, table.table_name)
                entry = found.setdefault(pair, PipelineTable(table, *pair, [], []))
                entry.workers.append(pool)
                if worker.worker_schema_name not in entry.worker_schemas:
                    entry.worker_schemas.append(worker.worker_schema_name)
        if connection is None:
            raise OperateError("the configuration's workers populate no table")
        sql = Sql(connection)
        tables = _pipeline_order(list(found.values()))
        job_pairs = [(t.schema, compat.job_table_name(t.name)) for t in tables]
        job_tables = {(j.schema, j.name): j for j in list_job_tables(connection, tables=job_pairs)}
        sql.statements += 1
        for entry, pair in zip(tables, job_pairs, strict=True):
            entry.job_table = job_tables.get(pair)
        schemas = list(dict.fromkeys(s for t in tables for s in t.worker_schemas))
        present = {
            (schema, name)
            for schema, name in sql.rows(
                "SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema IN ("
                + ", ".join(["%s"] * len(schemas))
                + ") AND table_name IN ('worker_log', 'error_log', 'job_attempt')",
                schemas,
            )
        }
        worker_tables = {(s, n): (s, n) in present for s in schemas for n in ("worker_log", "error_log", "job_attempt")}
        return cls(sql, tables, [s for s in schemas if any(p[0] == s for p in present)], worker_tables)

    def worker_table(self, schema: str, name: str) -> str | None:
        """Quoted full name of a worker table (``worker_log``, ``error_log``, ``job_attempt``), None if absent."""
        return identifiers.full_name(self.sql.backend, schema, name) if self.worker_tables.get((schema, name)) else None

    def select(self, name: str | None) -> list[PipelineTable]:
        """Every table (`name` None) or the one `name` names; OperateError if none or several."""
        if name is None:
            return list(self.tables)
        matches = [t for t in self.tables if name in t.names()]
        if not matches:
            known = ", ".join(t.label for t in self.tables)
            raise OperateError(f"--table {name!r}: not a table the workers populate ({known})")
        if len(matches) > 1:
            raise OperateError(
                f"--table {name!r} is ambiguous: {', '.join(t.label for t in matches)} (give schema.Class)"
            )
        return matches


def _pipeline_order(tables: list[PipelineTable]) -> list[PipelineTable]:
    """`tables` with every table after its ancestors among them (stable otherwise)."""
    names = {t.full_name: t for t in tables}
    ancestors: dict[str, set[str]] = {}
    for entry in tables:
        try:
            found = set(entry.table.ancestors()) - {entry.table.full_table_name}
        except Exception:  # the dependency graph cannot be loaded: keep the workers' order
            found = set()
        ancestors[entry.full_name] = {
            identifiers.full_name(compat.backend(entry.table.connection), *identifiers.split_full_name(a))
            for a in found
            if _safe(a)
        } & set(names)
    ordered: list[PipelineTable] = []
    placed: set[str] = set()
    while len(ordered) < len(tables):
        ready = [t for t in tables if t.full_name not in placed and ancestors[t.full_name] <= placed]
        ready = ready or [t for t in tables if t.full_name not in placed][:1]  # a cycle cannot happen; never loop
        for entry in ready:
            ordered.append(entry)
            placed.add(entry.full_name)
    return ordered


def _safe(name: str) -> bool:
    try:
        identifiers.split_full_name(name)
    except identifiers.UnsafeIdentifier:
        return False
    return True
