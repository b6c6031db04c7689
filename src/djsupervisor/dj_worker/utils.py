"""`get_workflow_operation_overview`, where datajoint-utilities keeps it (``dj_worker.utils``): lab dashboards
import it from here.

It reads what the workers registered in the worker schema (`djsupervisor.dj_worker.key_source`), as
datajoint-utilities does when its schema has a RegisteredWorker table. Its fallback for schemas without one
(every Imported and Computed table under the prefixes, with the default key source) has no counterpart: every
djsupervisor worker registers itself on its first cycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import datajoint as dj
import pandas as pd
from loguru import logger

from djsupervisor.dj_worker.key_source import progress_frame, registered_steps
from djsupervisor.worker import compat, identifiers

__all__ = ["get_workflow_operation_overview"]


def _registered_worker_table(connection: dj.Connection, schema: str):
    """RegisteredWorker of worker schema `schema` as a FreeTable, or None if it has none of djsupervisor's."""
    columns = {
        row[0].lower()
        for row in connection.query(
            "SELECT column_name FROM information_schema.columns WHERE table_schema=%s AND table_name=%s",
            args=(schema, "registered_worker"),
        ).fetchall()
    }
    if not columns:
        return None
    if "settings" not in columns:
        logger.warning("worker schema {} has a RegisteredWorker that djsupervisor did not declare", schema)
        return None
    return dj.FreeTable(connection, identifiers.full_name(compat.backend(connection), schema, "registered_worker"))


def get_workflow_operation_overview(
    worker_schema_name: str,
    db_prefixes: str | Sequence[str] | None = None,
    exclude_tables: Iterable[str] = (),
    connection: dj.Connection | None = None,
) -> pd.DataFrame:
    """The progress of every table the workers of `worker_schema_name` populate, one row per (table, worker).

    Columns: worker_name, total, incomplete, reserved, error, ignore, remaining (see
    `djsupervisor.dj_worker.key_source`); the index, ``process``, is the table as ``schema.Class`` with the
    worker's db_prefix left off. `db_prefixes` keeps the tables of schemas starting with one of them;
    `exclude_tables` (class names) are listed without counting their key source (NaN). An empty frame when
    the schema holds no registered worker.
    """
    connection = connection or dj.conn()
    table = _registered_worker_table(connection, worker_schema_name)
    if table is None:
        return pd.DataFrame()
    prefixes = (db_prefixes,) if isinstance(db_prefixes, str) else tuple(db_prefixes or ())
    steps = [s for s in registered_steps(table) if not prefixes or s.schema.startswith(prefixes)]
    return progress_frame(connection, steps, exclude_tables)
