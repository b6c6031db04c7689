"""Stale and orphaned reservations, transient-error clearing, db_prefix scoping, unprivileged users."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from jobtools import (
    THIS_HOST,
    dead_connection_id,
    dead_pid,
    job_status,
    open_connection,
    orphan_reservation,
    set_reservation,
)
from loguru import logger
from pipelines.lab import declare

from djsupervisor import DataJointWorker
from djsupervisor.worker.recovery import TRANSIENT_ERROR_PATTERNS, JobRecovery, recover_jobs

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def pipe(db):
    p = declare(db.schema_name("pipe"), job_tables=False)  # job tables appear as the tests use them
    p.seed(range(1, 9))
    return p


def test_stale_orphan_and_live_reservations(db, pipe):
    dead_conn = dead_connection_id(db)
    live = open_connection(db)
    gone = dead_pid()
    alive = subprocess.Popen(["sleep", "120"])
    other_host = "elsewhere.example.org"
    cases = {
        1: dict(host=other_host, pid=123, connection_id=dead_conn, hours_ago=25),  # stale
        2: dict(host=other_host, pid=123, connection_id=live.connection_id, hours_ago=25),  # alive
        3: dict(host=other_host, pid=123, connection_id=dead_conn, hours_ago=1),  # too young
        4: dict(host=THIS_HOST, pid=gone, connection_id=dead_conn, hours_ago=0),  # orphan
        5: dict(host=THIS_HOST, pid=alive.pid, connection_id=dead_conn, hours_ago=0),  # pid alive
        6: dict(host=THIS_HOST, pid=gone, connection_id=live.connection_id, hours_ago=0),  # session alive
        7: dict(host=THIS_HOST, pid=os.getpid(), connection_id=dead_conn, hours_ago=0),  # our own, session lost
    }
    for source_id, holder in cases.items():
        set_reservation(pipe.Square, dict(source_id=source_id), **holder)

    # retry_delay 0: a re-pended job may be taken at once (by default it waits 10 s, doubling per attempt)
    worker = DataJointWorker("t", db.schema_name("workers"), db_prefix=db.prefix, sleep_duration=0, retry_delay=0)
    worker(pipe.Square)
    summary = worker.run_once()
    alive.kill()
    alive.wait()
    assert (summary.recovered_stale, summary.recovered_orphaned) == (1, 2)
    # recovery runs first in the cycle: the re-pended jobs are worked in the same cycle
    done = {k["source_id"] for k in pipe.Square.keys()}
    assert done == {1, 4, 7, 8}
    for source_id in (2, 3, 5, 6):
        assert job_status(pipe.Square, dict(source_id=source_id)) == "reserved"
    live.close()


def test_recovered_reservation_is_pending_and_clean(db, pipe):
    orphan_reservation(db, pipe.Square, dict(source_id=1))
    counts = recover_jobs(db.connection, db_prefix=[db.prefix])
    assert counts.orphaned == 1
    row = (pipe.Square.jobs & dict(source_id=1)).to_dicts()[0]
    assert row["status"] == "pending"
    assert row["reserved_time"] is None and row["pid"] == 0 and row["connection_id"] == 0 and row["host"] == ""


def test_db_prefix_limits_recovery(db):
    inside = declare(db.schema_name("in_pipe"))
    outside = declare(f"{db.prefix}x_out_pipe")
    for p in (inside, outside):
        p.seed([1])
        orphan_reservation(db, p.Square, dict(source_id=1))
    assert recover_jobs(db.connection, db_prefix=[db.prefix + "_in"]).orphaned == 1
    assert job_status(inside.Square, dict(source_id=1)) == "pending"
    assert job_status(outside.Square, dict(source_id=1)) == "reserved"
    # neither tables nor a prefix: nothing (recovery is never server-wide)
    assert recover_jobs(db.connection).orphaned == 0
    assert job_status(outside.Square, dict(source_id=1)) == "reserved"


def test_default_scope_is_the_workers_own_tables(db):
    """A worker's recovery leaves other pipelines alone, even in schemas with its own db_prefix, unless it
    asks for the whole prefix (recovery_scope="db_prefix")."""
    mine, theirs = declare(db.schema_name("mine")), declare(db.schema_name("theirs"))
    for p in (mine, theirs):
        p.seed([1, 2])
        p.Square.jobs.refresh()
        orphan_reservation(db, p.Square, dict(source_id=1))
        p.Square.jobs.error(dict(source_id=2), error_message="Lost connection to MySQL server during query")
    own = DataJointWorker("own", db.schema_name("workers"), db_prefix=db.prefix, sleep_duration=0)
    own(mine.Square)
    summary = own.run_once()
    assert (summary.recovered_orphaned, summary.cleared_errors) == (1, 1)
    assert job_status(theirs.Square, dict(source_id=1)) == "reserved"
    assert job_status(theirs.Square, dict(source_id=2)) == "error"
    wide = DataJointWorker(
        "wide", db.schema_name("workers"), db_prefix=db.prefix, sleep_duration=0, recovery_scope="db_prefix"
    )
    summary = wide.run_once()
    assert (summary.recovered_orphaned, summary.cleared_errors) == (1, 1)
    assert job_status(theirs.Square, dict(source_id=1)) == "pending"
    with pytest.raises(ValueError, match="never server-wide"):
        DataJointWorker("nowhere", db.schema_name("workers"), recovery_scope="db_prefix")


def test_autoclear_builtin_and_configured_patterns(db, pipe):
    messages = {
        1: "ValueError: bad input",  # stays
        2: "OperationalError: (1213, 'Deadlock found when trying to get lock; try restarting transaction')",
        3: "SystemExit: SIGTERM received",
        4: "KeyboardInterrupt",
        5: "FlakyStorageError: NFS hiccup, try again",  # only with the configured pattern
        6: "LostConnectionError: Server connection lost due to an interface error.",
    }
    pipe.Square.jobs.refresh()
    for source_id, message in messages.items():
        pipe.Square.jobs.error(dict(source_id=source_id), error_message=message, error_stack=f"stack of {source_id}")

    plain = DataJointWorker(
        "plain", db.schema_name("workers"), db_prefix=db.prefix, sleep_duration=0, recovery_scope="db_prefix"
    )
    summary = plain.run_once()
    assert summary.cleared_errors == 4
    assert {k: job_status(pipe.Square, dict(source_id=k)) for k in messages} == {
        1: "error",
        2: "pending",
        3: "pending",
        4: "pending",
        5: "error",
        6: "pending",
    }

    configured = DataJointWorker(
        "configured",
        db.schema_name("workers"),
        db_prefix=db.prefix,
        autoclear_error_patterns=["%NFS HICCUP%"],
        sleep_duration=0,
        recovery_scope="db_prefix",
    )
    assert configured.run_once().cleared_errors == 1
    assert job_status(pipe.Square, dict(source_id=5)) == "pending"
    assert job_status(pipe.Square, dict(source_id=1)) == "error"

    cleared = plain.schema.tables["ErrorLog"]() & "kind='cleared'"
    rows = {r["key"]["source_id"]: r for r in cleared.to_dicts()}
    assert set(rows) == {2, 3, 4, 5, 6}
    assert rows[5]["error_message"] == messages[5] and rows[5]["error_stack"] == "stack of 5"
    assert rows[5]["worker_name"] == "configured" and rows[5]["process"] == pipe.Square().full_table_name


def test_builtin_patterns_are_documented_like_patterns():
    assert all(p.startswith(("%", "SystemExit", "KeyboardInterrupt")) for p in TRANSIENT_ERROR_PATTERNS)


@pytest.mark.parametrize("backend", ["mysql"], indirect=True)
def test_user_without_process_privilege_leaves_foreign_reservations(db, pipe):
    user = f"djs_np_{uuid.uuid4().hex[:8]}"
    root = db.connection
    for host in ("%", "localhost", "127.0.0.1"):
        root.query(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY 'pw'".replace("%", "%%"))
        root.query(f"GRANT ALL PRIVILEGES ON `{db.prefix}%`.* TO '{user}'@'{host}'".replace("%", "%%"))
    try:
        limited = open_connection(db, user=user, password="pw")
        root_session = open_connection(db)  # alive, but invisible to the limited user
        own_dead = open_connection(db, user=user, password="pw")
        own_dead_id = own_dead.connection_id
        own_dead.close()
        set_reservation(
            pipe.Square,
            dict(source_id=1),
            host="elsewhere",
            pid=1,
            connection_id=root_session.connection_id,
            hours_ago=48,
        )
        set_reservation(
            pipe.Square,
            dict(source_id=2),
            host="elsewhere",
            pid=1,
            connection_id=own_dead_id,
            hours_ago=48,
            user=f"{user}@localhost",
        )
        warnings = []
        sink = logger.add(lambda m: warnings.append(str(m)), level="WARNING")
        try:
            first = recover_jobs(limited, db_prefix=[db.prefix])
            worker = DataJointWorker(
                "np", db.schema_name("workers"), db_prefix=db.prefix, connection=limited, recovery_scope="db_prefix"
            )
            worker.run_once()
            worker.run_once()  # warns once per worker, not per cycle
        finally:
            logger.remove(sink)
        assert first.stale == 1
        assert job_status(pipe.Square, dict(source_id=1)) == "reserved"
        assert job_status(pipe.Square, dict(source_id=2)) == "pending"
        assert sum("cannot see other users' connections" in w for w in warnings) == 2  # one per JobRecovery
        limited.close()
        root_session.close()
    finally:
        for host in ("%", "localhost", "127.0.0.1"):
            root.query(f"DROP USER IF EXISTS '{user}'@'{host}'".replace("%", "%%"))


def test_job_table_list_is_kept_and_read_again_when_needed(db, pipe):
    recovery = JobRecovery(db.connection, db_prefix=[db.prefix], relist_seconds=3600)
    pipe.Square.jobs.refresh()
    assert recovery.run().orphaned == 0  # lists ~~square only: ~~cube is not declared yet
    pipe.Square.populate()
    cube = pipe.Cube()
    set_reservation(
        cube, dict(source_id=1), host=THIS_HOST, pid=dead_pid(), connection_id=dead_connection_id(db), hours_ago=0
    )
    assert recovery.run().orphaned == 0  # the kept list does not have ~~cube...
    assert job_status(cube, dict(source_id=1)) == "reserved"
    assert recovery.run(known_tables=[(db.schema_name("pipe"), "~~cube")]).orphaned == 1  # ...until named
    assert job_status(cube, dict(source_id=1)) == "pending"
    # two job tables: one counting statement finds the one holding a reservation
    orphan_reservation(db, pipe.Square, dict(source_id=2))
    assert recovery.run().orphaned == 1
    # a table dropped since the listing fails one pass, and the next pass lists again
    cube.jobs.drop()
    with pytest.raises(Exception):
        recovery.run()
    assert recovery.run().orphaned == 0
    assert [t.name for t in recovery.job_tables()] == ["~~square"]
