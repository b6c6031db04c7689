"""Names read from the catalog never become SQL: hostile job-table names are skipped, every name is quoted.

The attack (issue 18, reproduced before the fix): a database account creates, in a schema the worker
can see, a table with the job-table columns whose *name* closes the identifier quote and appends SQL.
DataJoint's `adapter.quote_identifier` does not double quotes inside a name, so job recovery's
statements ran the attacker's function with the worker's privileges on every cycle.
"""

from __future__ import annotations

import pytest
from jobtools import THIS_HOST, dead_connection_id, dead_pid
from loguru import logger
from pipelines.lab import declare

from djsupervisor import DataJointWorker
from djsupervisor.worker import identifiers
from djsupervisor.worker.recovery import JobRecovery

pytestmark = pytest.mark.timeout(90)

_JOB_COLUMNS_DDL = {
    "mysql": "id int, status varchar(16), priority int, created_time datetime(3), scheduled_time datetime(3), "
    "reserved_time datetime(3), completed_time datetime(3), duration float, error_message varchar(2047), "
    "error_stack blob, user varchar(255), host varchar(255), pid int, connection_id bigint, version varchar(255)",
    "postgresql": "id int, status varchar(16), priority int, created_time timestamp(3), scheduled_time timestamp(3), "
    "reserved_time timestamp(3), completed_time timestamp(3), duration float, error_message varchar(2047), "
    'error_stack bytea, "user" varchar(255), host varchar(255), pid int, connection_id bigint, version varchar(255)',
}


def _plant(db) -> tuple[str, str]:
    """An attacker's schema inside the test prefix: a function that counts its calls, a plausible job table
    `~~a` holding one reservation, and a job table named to run the function. Returns (schema, hostile name)."""
    c, backend = db.connection, db.backend
    schema = db.schema_name("atk")
    q = lambda name: identifiers.quote(backend, name)
    if backend == "postgresql":
        c.query(f"CREATE SCHEMA {q(schema)}")
        c.query(f"CREATE TABLE {q(schema)}.hits (n int)")
        c.query(
            f"CREATE FUNCTION {q(schema)}.f() RETURNS int LANGUAGE sql AS "
            f"$$ INSERT INTO {q(schema)}.hits VALUES (1); SELECT 1 $$"
        )
        hostile = f'~~a";SELECT {q(schema)}.f();--'
    else:
        c.query(f"CREATE DATABASE {q(schema)}")
        c.query(f"CREATE TABLE {q(schema)}.hits (n int)")
        c.query(
            f"CREATE FUNCTION {q(schema)}.f() RETURNS int SQL SECURITY INVOKER MODIFIES SQL DATA "
            f"BEGIN INSERT INTO {q(schema)}.hits VALUES (1); RETURN 1; END"
        )
        hostile = f"~~a`WHERE {q(schema)}.f()>0#"
    for name in ("~~a", hostile):
        c.query(f"CREATE TABLE {identifiers.full_name(backend, schema, name)} ({_JOB_COLUMNS_DDL[backend]})")
    user = '"user"' if backend == "postgresql" else "user"
    c.query(
        f"INSERT INTO {identifiers.full_name(backend, schema, '~~a')} (id, status, host, pid, connection_id, "
        f"{user}, error_message, reserved_time) VALUES (1, 'reserved', %s, %s, %s, '', '', CURRENT_TIMESTAMP)",
        args=(THIS_HOST, dead_pid(), dead_connection_id(db)),
    )
    return schema, hostile


def _hits(db, schema: str) -> int:
    return db.connection.query(f"SELECT COUNT(*) FROM {identifiers.quote(db.backend, schema)}.hits").fetchone()[0]


def test_hostile_job_table_name_is_skipped_and_runs_nothing(db):
    schema, _ = _plant(db)
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(str(m)), level="WARNING")
    try:
        # the widest scope a worker can ask for: every job table of the schemas with this prefix
        recovery = JobRecovery(db.connection, db_prefix=[schema])
        counts = recovery.run()
        recovery.run()
    finally:
        logger.remove(sink)
    assert _hits(db, schema) == 0, "the planted function ran"
    assert counts.orphaned == 1  # the well-named table beside it is recovered as usual
    assert [t.name for t in recovery.job_tables()] == ["~~a"]
    assert sum("job recovery skips" in w and "not DataJoint's" in w for w in warnings) == 1  # warned once


def test_default_scope_never_lists_other_schemas(db):
    schema, _ = _plant(db)
    pipe = declare(db.schema_name("pipe"), job_tables=False)  # the worker's first populate declares ~~square
    pipe.seed([1, 2])
    worker = DataJointWorker("own", db.schema_name("workers"), db_prefix=db.prefix, sleep_duration=0)
    worker(pipe.Square)
    worker.run_once()
    worker.run_once()  # the first populate declared ~~square: the second cycle's recovery lists it
    assert _hits(db, schema) == 0
    assert [t.name for t in worker._recovery.job_tables()] == ["~~square"]
    # the attacker's well-named reservation, outside the worker's own tables, is not its business
    rows = db.connection.query(f"SELECT status FROM {identifiers.full_name(db.backend, schema, '~~a')}").fetchall()
    assert [tuple(r) for r in rows] == [("reserved",)]


def test_quote_doubles_the_quote_character_on_the_server(db):
    """Any name, however hostile, is exactly one identifier: created, read back from the catalog, queried."""
    schema = db.schema_name("names")
    backend = db.backend
    db.connection.query(
        ("CREATE SCHEMA " if backend == "postgresql" else "CREATE DATABASE ") + identifiers.quote(backend, schema)
    )
    names = ["~~a`b", '~~a"b', "~~a`;--", '~~a";--', "~~a``", "~~a\\`"]
    for name in names:
        db.connection.query(f"CREATE TABLE {identifiers.full_name(backend, schema, name)} (id int)")
        db.connection.query(f"INSERT INTO {identifiers.full_name(backend, schema, name)} VALUES (7)")
        rows = db.connection.query(f"SELECT id FROM {identifiers.full_name(backend, schema, name)}").fetchall()
        assert [tuple(r) for r in rows] == [(7,)]
    listed = db.connection.query(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", args=(schema,)
    ).fetchall()
    assert sorted(r[0] for r in listed) == sorted(names)


def test_identifier_rules():
    assert identifiers.quote("mysql", "a`b") == "`a``b`"
    assert identifiers.quote("postgresql", 'a"b') == '"a""b"'
    assert identifiers.split_full_name("`lab_x`.`__spikes`") == ("lab_x", "__spikes")
    assert identifiers.split_full_name('"lab_x"."#lookup"') == ("lab_x", "#lookup")
    assert identifiers.split_full_name("lab_x.__spikes") == ("lab_x", "__spikes")  # as the children report it
    for bad in ("`lab_x`.__spikes", "lab`x.y", "a.b.c", "lab_x.`__s`"):
        with pytest.raises(identifiers.UnsafeIdentifier):
            identifiers.split_full_name(bad)
    assert identifiers.is_job_table_name("~~spikes") and not identifiers.is_job_table_name("~~a`b")
    assert not identifiers.is_column_name("a b") and identifiers.is_column_name("session_id")
    with pytest.raises(identifiers.UnsafeIdentifier):
        identifiers.quote("mysql", "a\x00b")


def test_worker_schema_name_must_be_a_plain_name():
    for bad in ("", "lab`workers", 'lab"x', "lab workers", "a.b"):
        with pytest.raises(ValueError, match="worker_schema_name"):
            DataJointWorker("w", bad)
    assert DataJointWorker("w", "lab-01_workers$").worker_schema_name == "lab-01_workers$"
