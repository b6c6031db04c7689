"""`djsupervisor migrate-schema NAME`: datajoint-utilities' worker tables converted into djsupervisor's, rows kept.

A worker refuses a schema that holds upstream's tables (`djsupervisor.worker.upstream_schema`); this is the
way to keep it. The rows are read first and converted in memory, so bad data stops the command before it
changes anything; then each upstream table is copied, as it is, to a ``~dju_`` table (unless
``--drop-old``), the originals are dropped (upstream's ``registered_worker`` has the name of ours) and
djsupervisor's tables are declared and filled in one transaction. `MAPPING` is the --help's account of what
goes where; it is the one description, so it is kept next to the code that does it.

Importing this module is cheap (the command line builds its parser from `MAPPING`); DataJoint and the
database are reached only when the command runs.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Iterable
from typing import Any

#: What the command does with each upstream column: its --help (keep it true to `convert`).
MAPPING = """\
Converts the worker tables datajoint-utilities created in schema NAME into djsupervisor's, keeping their
rows. Upstream's timestamps are UTC; djsupervisor's are the host's local time: they are converted.

registered_worker (+ its Process part) -> RegisteredWorker, one row per worker definition:
  worker_name -> worker_name; registration_time -> process_start and last_heartbeat;
  worker_kwargs, worker_config_uuid and every Process row (process, process_index, full_table_name,
  key_source_sql, process_kwargs) -> settings (JSON); host "(datajoint-utilities)", pid 0, state "exited".
~worker_log -> WorkerLog, one row each:
  process_timestamp -> log_time; process, worker_name, host, pid kept; cycle and job counts 0.
~error_log -> ErrorLog, one row each:
  error_timestamp -> error_time; process, host, pid, error_message kept; key (JSON text) -> key;
  error_stack (DataJoint blob) -> error_stack; kind "cleared" for a table's job error (upstream logged
  those when it cleared them), "callable" otherwise; worker_name "".
Not kept in djsupervisor's tables: the database user (user), key_hash, process_config_uuid. Nothing is
lost: each upstream table is first copied as it is to ~dju_<table>; --drop-old drops those copies at the
end instead.
"""

MIGRATED_HOST = "(datajoint-utilities)"  # RegisteredWorker's host of a converted registration
BACKUP_PREFIX = "~dju_"
_INSERT_BATCH = 1000  # rows per INSERT: a whole log in one statement could pass max_allowed_packet


class MigrationError(Exception):
    """What stops the command before it changes anything; ``str()`` is one line."""


def _local(utc: Any) -> datetime.datetime:
    """A naive UTC timestamp (upstream's) as the host's naive local time (djsupervisor's), to the millisecond."""
    local = utc.replace(tzinfo=datetime.UTC).astimezone().replace(tzinfo=None)
    return local.replace(microsecond=local.microsecond // 1000 * 1000)


def _decoded(value: Any) -> Any:
    """A value of an upstream blob column (longblob, mediumblob): DataJoint-serialized as upstream wrote it,
    decoded; raw bytes that are not a DataJoint blob, as text."""
    from djsupervisor.worker import compat

    if value is None:
        return None
    data = bytes(value)  # PostgreSQL's bytea arrives as a memoryview
    try:
        return compat.unpack_blob(data)
    except Exception:  # not a DataJoint blob: keep what it says
        return data.decode("utf-8", errors="replace")


def _uuid_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)) and len(bytes(value)) == 16:
        return str(uuid.UUID(bytes=bytes(value)))  # MySQL's binary(16)
    return str(value)


def _key(text: Any) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return {"key": str(text)}


def convert(rows: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """djsupervisor's rows (by table class name) from upstream's (by table name), as `MAPPING` says."""
    from djsupervisor.worker.schema import json_safe

    processes: dict[str, list[dict]] = {}
    for row in rows.get("registered_worker__process", []):
        process = {k: row.get(k) for k in ("process", "process_index", "full_table_name")}
        process.update(key_source_sql=_decoded(row.get("key_source_sql")), kwargs=_decoded(row.get("process_kwargs")))
        processes.setdefault(row["worker_name"], []).append(process)
    registered = []
    for row in rows.get("registered_worker", []):
        kwargs = _decoded(row.get("worker_kwargs"))
        settings = dict(kwargs) if isinstance(kwargs, dict) else {"worker_kwargs": kwargs}
        settings.update(
            migrated_from="datajoint-utilities",
            worker_config_uuid=_uuid_text(row.get("worker_config_uuid")),
            processes=sorted(processes.get(row["worker_name"], []), key=lambda p: p["process_index"]),
        )
        when = _local(row["registration_time"])
        registered.append(
            dict(
                worker_name=row["worker_name"][:64],
                host=MIGRATED_HOST,
                pid=0,
                process_start=when,
                settings=json_safe(settings),
                connection_id=0,
                state="exited",
                last_heartbeat=when,
            )
        )
    worker_log = [
        dict(
            log_id=uuid.uuid4().hex,
            worker_name=(row.get("worker_name") or "")[:64],
            host=(row.get("host") or "")[:255],
            pid=int(row.get("pid") or 0),
            cycle=0,
            process=row["process"],
            log_time=_local(row["process_timestamp"]),
            jobs_done=0,
            jobs_failed=0,
            duration=0.0,
        )
        for row in rows.get("~worker_log", [])
    ]
    error_log = []
    for row in rows.get("~error_log", []):
        stack = _decoded(row.get("error_stack"))
        error_log.append(
            dict(
                error_id=uuid.uuid4().hex,
                worker_name="",
                host=(row.get("host") or "")[:255],
                pid=int(row.get("pid") or 0),
                error_time=_local(row["error_timestamp"]),
                kind="cleared" if "." in row["process"] else "callable",  # "schema.Table" or a function's name
                process=row["process"],
                key=json_safe(_key(row.get("key"))),
                error_message=(row.get("error_message") or "")[:2047],
                error_stack=None if stack is None else str(stack),
            )
        )
    return dict(RegisteredWorker=registered, WorkerLog=worker_log, ErrorLog=error_log)


def _read(connection: Any, table: str) -> list[dict[str, Any]]:
    cursor = connection.query(f"SELECT * FROM {table}")
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _existing(connection: Any, schema: str, tables: Iterable[str]) -> list[str]:
    names = list(tables)
    marks = ", ".join(["%s"] * len(names))
    rows = connection.query(
        f"SELECT table_name FROM information_schema.tables WHERE table_schema = %s AND table_name IN ({marks})",
        args=(schema, *names),
    ).fetchall()
    return sorted(row[0] for row in rows)


def migrate_schema(connection: Any, schema: str, *, drop_old: bool = False) -> dict[str, int]:
    """Convert the datajoint-utilities worker tables of `schema` (see `MAPPING`); returns the rows written
    per djsupervisor table. MigrationError, before any change, when there is nothing to convert."""
    from djsupervisor.worker import compat, identifiers
    from djsupervisor.worker.schema import WorkerSchema
    from djsupervisor.worker.upstream_schema import upstream_tables

    backend = compat.backend(connection)

    def full(table: str) -> str:
        return identifiers.full_name(backend, schema, table)

    if not _existing_schema(connection, schema):
        raise MigrationError(f"schema {schema!r} does not exist")
    found = upstream_tables(connection, schema)
    if not found:
        raise MigrationError(f"schema {schema!r} holds no datajoint-utilities worker tables: nothing to migrate")
    backups = {table: BACKUP_PREFIX + table for table in found}
    taken = _existing(connection, schema, backups.values())
    if taken:
        raise MigrationError(f"schema {schema!r} already has {', '.join(taken)} (from an earlier migrate-schema?)")
    converted = convert({table: _read(connection, full(table)) for table in found})
    for table, backup in backups.items():  # a copy of each, rows as they were, before anything is dropped
        if backend == "postgresql":
            connection.query(f"CREATE TABLE {full(backup)} (LIKE {full(table)} INCLUDING DEFAULTS)")
        else:
            connection.query(f"CREATE TABLE {full(backup)} LIKE {full(table)}")
        connection.query(f"INSERT INTO {full(backup)} SELECT * FROM {full(table)}")
    for table in sorted(found, key=lambda name: name != "registered_worker__process"):  # the part before its master
        connection.query(f"DROP TABLE {full(table)}")
    tables = WorkerSchema(schema, connection).tables
    with connection.transaction:
        for name, rows in converted.items():
            for start in range(0, len(rows), _INSERT_BATCH):
                tables[name].insert(rows[start : start + _INSERT_BATCH])
    if drop_old:
        for backup in backups.values():
            connection.query(f"DROP TABLE {full(backup)}")
    return {name: len(rows) for name, rows in converted.items()}


def _existing_schema(connection: Any, schema: str) -> bool:
    rows = connection.query(
        "SELECT schema_name FROM information_schema.schemata WHERE schema_name = %s", args=(schema,)
    ).fetchall()
    return bool(rows)


def run(schema: str, *, drop_old: bool, database: Any = None) -> str:
    """The command: connect (with a config's [database] settings when given), migrate, and say what was done."""
    import datajoint as dj

    from djsupervisor.worker import identifiers

    if not identifiers.is_schema_name(schema):
        raise MigrationError(f"NAME must be a schema name of letters, digits, '_', '-' or '$', got {schema!r}")
    if database is not None:
        database.apply()
    try:
        connection = dj.conn()
    except Exception as error:
        raise MigrationError(f"database: cannot connect: {error.__class__.__name__}: {error}".splitlines()[0])
    counts = migrate_schema(connection, schema, drop_old=drop_old)
    kept = "dropped" if drop_old else f"kept as {BACKUP_PREFIX}* (drop them when you no longer need them)"
    return (
        f"{schema}: migrated {counts['RegisteredWorker']} RegisteredWorker, {counts['WorkerLog']} WorkerLog and "
        f"{counts['ErrorLog']} ErrorLog rows; datajoint-utilities' tables {kept}"
    )
