"""Worker schemas created by datajoint-utilities: told apart by their tables' columns, refused in one line.

A lab moving from datajoint-utilities' ``dj_worker`` often points djsupervisor at the worker schema it
already has. That schema holds upstream's ``registered_worker`` (one row per worker definition, with its
``Process`` part ``registered_worker__process``), ``~worker_log`` and ``~error_log``. djsupervisor's
RegisteredWorker has the same table name and another heading (one row per process), so declaring over it
silently kept upstream's table and every registration, heartbeat and log row failed, with a warning per
cycle, for ever.

So the first use of a worker schema (`WorkerSchema.tables`) looks at the columns of those four names in the
server's catalog and, if any has upstream's, raises `UpstreamWorkerSchema`: one line naming the schema and
the two ways out, a new ``worker_schema_name`` or ``djsupervisor migrate-schema NAME``
(`djsupervisor.worker.migrate`, which converts the tables keeping their rows). The worker's loop lets it
through its bookkeeping's catch-all (`WorkerRecord.attempt`), logs it once and stops.

Upstream's definitions (datajoint_utilities/dj_worker/worker_schema.py, read for this module):

* ``registered_worker``: worker_name (key), registration_time datetime(6) (UTC), worker_kwargs longblob,
  worker_config_uuid uuid;
* ``registered_worker__process``: worker_name, process_index (key), process, full_table_name,
  key_source_sql longblob, process_kwargs longblob, process_config_uuid uuid;
* ``~worker_log``: process_timestamp datetime(6) (UTC), process (key), worker_name, host, user, pid;
* ``~error_log``: process, key_hash (key), error_timestamp datetime(6) (UTC), key varchar (JSON text),
  error_message, error_stack mediumblob, host, user, pid.
"""

from __future__ import annotations

from collections import defaultdict

import datajoint as dj

#: Each upstream table, and columns only its heading has (djsupervisor's tables have none of them).
UPSTREAM_TABLES: dict[str, tuple[str, ...]] = {
    "registered_worker": ("registration_time", "worker_kwargs", "worker_config_uuid"),
    "registered_worker__process": ("process_index", "process_kwargs", "process_config_uuid"),
    "~worker_log": ("process_timestamp", "process"),
    "~error_log": ("key_hash", "error_timestamp"),
}


class UpstreamWorkerSchema(RuntimeError):
    """The worker schema holds datajoint-utilities' worker tables; ``str()`` is one line with the ways out."""

    def __init__(self, schema: str, tables: list[str]) -> None:
        self.schema, self.tables = schema, tables
        super().__init__(
            f"worker schema {schema!r} holds datajoint-utilities' worker tables ({', '.join(tables)}): "
            f"give the worker a new worker_schema_name, or convert them, rows kept, with "
            f"`djsupervisor migrate-schema {schema}`"
        )


def upstream_tables(connection: dj.Connection, schema: str) -> list[str]:
    """The tables of `schema` that have datajoint-utilities' heading (none if the schema does not exist)."""
    names = list(UPSTREAM_TABLES)
    marks = ", ".join(["%s"] * len(names))
    rows = connection.query(
        "SELECT table_name, column_name FROM information_schema.columns "
        f"WHERE table_schema = %s AND table_name IN ({marks})",
        args=(schema, *names),
    ).fetchall()
    columns: dict[str, set[str]] = defaultdict(set)
    for table, column in rows:
        columns[table].add(column)
    return [name for name, marks_ in UPSTREAM_TABLES.items() if set(marks_) <= columns[name]]


def refuse_upstream(connection: dj.Connection, schema: str) -> None:
    """Raise `UpstreamWorkerSchema` if `schema` holds datajoint-utilities' worker tables."""
    found = upstream_tables(connection, schema)
    if found:
        raise UpstreamWorkerSchema(schema, found)
