"""Attempt counting on real job tables: orphans, stale reservations and transient errors each count an
attempt, are re-pended after a growing delay, and are given up on as errors after max_attempts; a failure
seen twice counts once; the supervisor's reason for a death replaces the generic one."""

from __future__ import annotations

import pytest
from jobtools import THIS_HOST, dead_connection_id, dead_pid, job_status, open_connection, set_reservation
from pipelines.lab import declare

from djsupervisor.worker import identifiers
from djsupervisor.worker.attempts import GAVE_UP, AttemptBook, Failure, key_hash, retry_delay
from djsupervisor.worker.dead_jobs import settle_dead_job
from djsupervisor.worker.recovery import JobRecovery
from djsupervisor.worker.schema import WorkerSchema

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def pipe(db):
    p = declare(db.schema_name("pipe"))
    p.seed(range(1, 6))
    p.Square.jobs.refresh()
    return p


def book_for(db, connection=None, **rules) -> AttemptBook:
    schema = WorkerSchema(db.schema_name("workers"), connection or db.connection)
    return AttemptBook(connection or db.connection, lambda: schema.tables["JobAttempt"].full_table_name, **rules)


def recovery(db, pipe, book, **kwargs) -> JobRecovery:
    return JobRecovery(db.connection, tables=[(pipe.schema.database, "~~square")], attempts=book, **kwargs)


def job_row(pipe, key: dict) -> dict:
    return (pipe.Square.jobs & key).to_dicts()[0]


def waits_for(db, pipe, key: dict) -> float:
    """Seconds until `key`'s job may be taken again (its scheduled_time from now, by the server's clock)."""
    q = db.connection.adapter.quote_identifier
    where = " AND ".join(f"{q(k)}=%s" for k in key)
    seconds = "EXTRACT(EPOCH FROM ({} - CURRENT_TIMESTAMP(3)))" if db.backend == "postgresql" else None
    column = q("scheduled_time")
    expression = (
        seconds.format(column) if seconds else f"TIMESTAMPDIFF(MICROSECOND, CURRENT_TIMESTAMP(3), {column}) / 1e6"
    )
    row = db.connection.query(
        f"SELECT {expression} FROM {pipe.Square.jobs.full_table_name} WHERE {where}", args=tuple(key.values())
    ).fetchone()
    return float(row[0])


def orphan(db, pipe, key: dict) -> int:
    pid = dead_pid()
    set_reservation(pipe.Square, key, host=THIS_HOST, pid=pid, connection_id=dead_connection_id(db), hours_ago=0)
    return pid


def set_error(db, pipe, key: dict, message: str) -> None:
    """Make `key`'s job an error with `message`, raised now (each call a new error: a new completed_time)."""
    q = db.connection.adapter.quote_identifier
    where = " AND ".join(f"{q(k)}=%s" for k in key)
    db.connection.query(
        f"UPDATE {pipe.Square.jobs.full_table_name} SET {q('status')}='error', {q('error_message')}=%s, "
        f"{q('completed_time')}=CURRENT_TIMESTAMP(3) WHERE {where}",
        args=(message, *key.values()),
    )


def test_an_orphan_is_retried_after_a_growing_delay_then_given_up(db, pipe):
    book = book_for(db, max_attempts=3, retry_delay=30)
    key = dict(source_id=1)
    for attempt in (1, 2):
        orphan(db, pipe, key)
        counts = recovery(db, pipe, book).run()  # a new JobRecovery each time: the count is in the database
        assert counts.orphaned == 1 and counts.given_up == 0
        assert job_status(pipe.Square, key) == "pending"
        assert 30 * 2 ** (attempt - 1) - 5 < waits_for(db, pipe, key) <= 30 * 2 ** (attempt - 1) + 1
    assert book.last(book_target(pipe), key)[0] == 2
    orphan(db, pipe, key)
    counts = recovery(db, pipe, book).run()
    assert counts.given_up == 1 and counts.orphaned == 0
    row = job_row(pipe, key)
    assert row["status"] == "error"
    assert row["error_message"].startswith(f"{GAVE_UP}3 attempts: the worker process died 3 times running this job")
    assert book.last(book_target(pipe), key) is None  # an operator's retry starts afresh
    assert recovery(db, pipe, book).run().given_up == 0 and job_status(pipe.Square, key) == "error"
    # the other keys were never touched
    assert {job_status(pipe.Square, dict(source_id=i)) for i in range(2, 6)} == {"pending"}


def book_target(pipe) -> str:
    return pipe.Square().full_table_name


def test_a_transient_error_storm_is_given_up_with_its_count(db, pipe):
    book = book_for(db, max_attempts=2, retry_delay=0)
    keys = [dict(source_id=i) for i in (1, 2, 3)]
    for round_ in (1, 2):
        for key in keys:
            set_error(db, pipe, key, f"OperationalError: (2013, 'Lost connection to MySQL server') #{round_}")
        counts = recovery(db, pipe, book).run()
        if round_ == 1:
            assert counts.cleared == 3 and counts.given_up == 0
            assert {job_status(pipe.Square, k) for k in keys} == {"pending"}
            assert waits_for(db, pipe, keys[0]) <= 0.5  # retry_delay 0: runnable at once
    assert counts.given_up == 3 and counts.cleared == 0
    message = job_row(pipe, keys[0])["error_message"]
    last = "OperationalError: (2013, 'Lost connection to MySQL server') #2"
    assert message == f"{GAVE_UP}2 attempts: a transient error 2 times (last: {last})"
    # the message still matches "%lost connection%", and is never cleared again
    assert recovery(db, pipe, book).run().cleared == 0
    assert {job_status(pipe.Square, k) for k in keys} == {"error"}


def test_one_failure_seen_twice_counts_once(db, pipe):
    book = book_for(db)
    other = book_for(db, open_connection(db))  # another host's process, sharing the worker schema
    target = book_target(pipe)
    failure = Failure(dict(source_id=1), "h:1", "died", "its process was gone")
    assert book.count(target, [failure]) == [1]
    assert other.count(target, [failure]) == [1]
    assert other.count(target, [Failure(dict(source_id=1), "h:2", "died", "x")]) == [2]
    assert book.last(target, dict(source_id=1)) == (2, "h:2", "died", "x")
    assert key_hash(dict(a=1, b="x")) == key_hash(dict(b="x", a=1.0))


def test_the_supervisors_reason_replaces_the_generic_one(db, pipe):
    book = book_for(db, max_attempts=2, retry_delay=0)
    key = dict(source_id=2)
    table = pipe.Square().full_table_name
    # the replacement child gets there first: its reason is the one counted
    pid = orphan(db, pipe, key)
    job = dict(table=table, key=key, pid=pid, kind="died", reason="killed by SIGKILL, RSS 3.1 GiB")
    assert settle_dead_job(db.connection, job, book) == "re-pended after a delay"
    assert book.last(table, key)[2:] == ("died", "killed by SIGKILL, RSS 3.1 GiB")
    # a sibling's recovery gets there first and gives up: the child completes the message
    pid = orphan(db, pipe, key)
    assert recovery(db, pipe, book).run().given_up == 1
    assert "its process (pid" in job_row(pipe, key)["error_message"]
    job = dict(job, pid=pid, reason="killed by SIGKILL, RSS 2.0 GiB")
    assert settle_dead_job(db.connection, job, book) == "given up (reason completed)"
    assert job_row(pipe, key)["error_message"] == (
        f"{GAVE_UP}2 attempts: the worker process died 2 times running this job (last: killed by SIGKILL, RSS 2.0 GiB)"
    )


def test_a_timed_out_job_and_a_stopped_one(db, pipe):
    book = book_for(db, max_attempts=1)
    table = pipe.Square().full_table_name
    pid = orphan(db, pipe, dict(source_id=3))
    job = dict(table=table, key=dict(source_id=3), pid=pid, kind="timeout", reason="after 5 s")
    assert settle_dead_job(db.connection, job, book) == "given up after max_attempts"
    assert job_row(pipe, dict(source_id=3))["error_message"] == f"{GAVE_UP}1 attempt: timed out once after 5 s"
    # killed at the end of a graceful stop: not the job's fault, back to pending at once, not counted
    pid = orphan(db, pipe, dict(source_id=4))
    job = dict(table=table, key=dict(source_id=4), pid=pid, kind="stopped", reason="killed by SIGKILL")
    assert settle_dead_job(db.connection, job, book).startswith("re-pended (not counted")
    assert job_status(pipe.Square, dict(source_id=4)) == "pending"
    assert book.last(table, dict(source_id=4)) is None


def test_stale_reservations_of_another_host_count_too(db, pipe):
    book = book_for(db, max_attempts=3)
    key = dict(source_id=5)
    conn = dead_connection_id(db)
    set_reservation(pipe.Square, key, host="elsewhere.example.org", pid=4242, connection_id=conn, hours_ago=30)
    counts = recovery(db, pipe, book, stale_timeout_hours=24).run()
    assert counts.stale == 1
    attempts, incident, kind, reason = book.last(book_target(pipe), key)
    assert (attempts, incident, kind) == (1, "elsewhere.example.org:4242", "stale")
    assert f"connection {conn} of elsewhere.example.org" in reason


def test_settling_refuses_names_datajoint_would_not_make(db, pipe):
    book = book_for(db)
    pid = orphan(db, pipe, dict(source_id=1))
    job = dict(key=dict(source_id=1), pid=pid, kind="died", reason="x")
    for bad in ("`x`.`__a` WHERE 1=1 #`", '"x"."a";DROP TABLE y;--"', "x.Y", "x.y;--", "`x`.`a b`"):
        with pytest.raises(identifiers.UnsafeIdentifier):
            settle_dead_job(db.connection, dict(job, table=bad), book)
    with pytest.raises(identifiers.UnsafeIdentifier):
        settle_dead_job(db.connection, dict(job, table=book_target(pipe), key={"source_id=1 OR 1": 1}), book)
    assert job_status(pipe.Square, dict(source_id=1)) == "reserved"


def test_retry_delay_doubles_and_is_capped():
    assert [retry_delay(n, 10) for n in (0, 1, 2, 3)] == [0.0, 10.0, 20.0, 40.0]
    assert retry_delay(40, 10) == 3600.0 and retry_delay(3, 0) == 0.0
