"""Finding DataJoint job tables on the server: one catalog query, and only names DataJoint would have made.

Job recovery (`djsupervisor.worker.recovery`) works on the job tables a worker is scoped to: those named
by the caller (its own queues) and, when asked for, every job table of the schemas starting with its
`db_prefix`. They are found in ``information_schema.columns``, never across the whole server, and a table
is taken for a job table only when it has every column of DataJoint 2.x's job table layout.

Every name read from the catalog is checked against DataJoint's naming (`identifiers`): a job table with
any other schema, table or column name is skipped with one warning per process, never put into SQL.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Sequence

import datajoint as dj
from loguru import logger

from djsupervisor.worker import compat, identifiers

#: Catalog schemas of either backend: never a pipeline's.
SYSTEM_SCHEMAS = ("information_schema", "performance_schema", "mysql", "sys", "pg_catalog", "pg_toast")


@dataclasses.dataclass(frozen=True)
class JobTable:
    """A job table on the server: its schema, name and key columns."""

    schema: str
    name: str
    key_columns: tuple[str, ...]

    @property
    def target_candidates(self) -> tuple[str, str]:
        """Possible names of the table this queue serves: DataJoint drops the leading underscores of a
        computed (``__x``) or imported (``_x``) table's name to name its queue ``~~x``."""
        return compat.job_table_targets(self.name)


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching names that start with `prefix` (its wildcards escaped)."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


_warned_names: set[tuple[str, str]] = set()  # unsafe catalog names already warned about (once per process)


def _safe_names(schema: str, table: str, columns: Sequence[str]) -> bool:
    """Whether a job table's names are DataJoint's own; warns once about one that is not."""
    names_ok = identifiers.is_schema_name(schema) and identifiers.is_job_table_name(table)
    if names_ok and all(identifiers.is_column_name(c) for c in columns):
        return True
    if (schema, table) not in _warned_names:
        _warned_names.add((schema, table))
        logger.warning(
            "job recovery skips {!r}.{!r}: its schema, table or column names are not DataJoint's (a table "
            "named to inject SQL, or not made by DataJoint)",
            schema,
            table,
        )
    return False


def list_job_tables(
    connection: dj.Connection,
    db_prefix: Sequence[str] | None = None,
    *,
    tables: Iterable[tuple[str, str]] = (),
) -> list[JobTable]:
    """The job tables named in `tables` ((schema, job table) pairs), and every job table in schemas whose
    names start with one of `db_prefix`. Neither given: none (recovery is never server-wide)."""
    named = set(tables)
    clauses, args = [], []
    if named:
        clauses += ["(table_schema = %s AND table_name = %s)"] * len(named)
        args += [name for pair in sorted(named) for name in pair]
    if db_prefix:  # lets the server skip other schemas instead of sending their columns
        clauses += ["(table_schema LIKE %s AND table_name LIKE %s)"] * len(db_prefix)
        args += [value for p in db_prefix for value in (like_prefix(p), compat.JOB_TABLE_PREFIX + "%")]
    if not clauses:
        return []
    where = " OR ".join(clauses)
    rows = connection.query(
        "SELECT table_schema, table_name, column_name FROM information_schema.columns "
        f"WHERE {where} ORDER BY table_schema, table_name, ordinal_position",
        args=tuple(args),
    ).fetchall()
    columns: dict[tuple[str, str], list[str]] = defaultdict(list)
    for schema, table, column in rows:
        if schema in SYSTEM_SCHEMAS:
            continue
        if (schema, table) not in named and not (
            db_prefix and table.startswith(compat.JOB_TABLE_PREFIX) and any(map(schema.startswith, db_prefix))
        ):
            continue
        columns[(schema, table)].append(column)
    return [
        JobTable(schema, table, tuple(c for c in cols if c not in compat.JOB_TABLE_COLUMNS))
        for (schema, table), cols in columns.items()
        if set(cols) >= compat.JOB_TABLE_COLUMNS  # a DataJoint 2.x job table, not some other table named ~~x
        and _safe_names(schema, table, cols)
    ]
