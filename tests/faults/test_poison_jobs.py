"""Poison jobs under a real supervisor, with its default restart settings: a key whose make() SIGKILLs its
own process, one that always hits a transient error, one that hangs past job_timeout. Each ends as an
``error`` job that says why after `max_attempts` tries, every other key completes, the pool is never FATAL
and the supervisor stops cleanly. Attempt counts survive a restart and are shared by two hosts."""

from __future__ import annotations

import signal

import pytest
from helpers import wait_until, write_config
from pipelines.lab import Lab, declare

from djsupervisor.worker.attempts import GAVE_UP

pytestmark = [pytest.mark.process, pytest.mark.timeout(240)]

KEYS = 12
POISON = dict(source_id=5)


def seed(db, **poison) -> Lab:
    lab = declare(db.schema_name("pipe"))
    lab.seed([i for i in range(1, KEYS + 1) if i != POISON["source_id"]], delay=0.05)
    lab.seed([POISON["source_id"]], **poison)
    return lab


def config(tmp_path, *, name: str = "poison", pool: str = "", replicas: int = 2, retry_delay: float = 1) -> str:
    """The supervisor's defaults (no tuned backoff); the pool retries after `retry_delay` s (default 10 s)."""
    return str(
        write_config(
            tmp_path / f"{name}.toml",
            f"""
        [supervisor]
        name = "{name}"
        control_socket = "{tmp_path / f"{name}.sock"}"
        [[worker]]
        name = "standard"
        target = "pipelines.workers:standard"
        replicas = {replicas}
        retry_delay = {retry_delay}
        {pool}
    """,
        )
    )


def poison_job(lab: Lab) -> dict:
    rows = (lab.Square.jobs & POISON).to_dicts()
    return rows[0] if rows else {}


def others_done(lab: Lab) -> bool:
    return len(lab.Square()) == KEYS - 1


def attempts(db, lab: Lab) -> int:
    """The poison job's attempts so far (0 before the worker schema has its JobAttempt table)."""
    q = db.connection.adapter.quote_identifier
    tables = db.connection.query(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema=%s AND table_name='job_attempt'",
        args=(db.schema_name("workers"),),
    ).fetchone()[0]
    if not tables:
        return 0
    row = db.connection.query(
        f"SELECT {q('attempts')} FROM {q(db.schema_name('workers'))}.{q('job_attempt')} WHERE {q('table_name')}=%s",
        args=(lab.Square().full_table_name,),
    ).fetchone()
    return int(row[0]) if row else 0


def given_up(lab: Lab) -> str:
    job = poison_job(lab)
    given = job.get("status") == "error" and job["error_message"].startswith(GAVE_UP)
    return job["error_message"] if given else ""


def timed_out(message: str) -> str:
    """`message` if it gives the job up for timing out, else ""."""
    return message if "timed out" in message else ""


def assert_clean_stop(sup) -> None:
    assert "FATAL" not in sup.output.upper().replace("FATAL_AFTER", "")
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(60) == 0


def test_a_job_that_kills_its_process_is_given_up_and_the_pool_keeps_working(db, supervise, tmp_path):
    lab = seed(db, kill=1)
    sup = supervise(["-c", config(tmp_path)])
    sup.wait_children({"standard": 2})
    # a sibling's recovery may give the job up first, with a generic reason ("its process ... was gone"); the
    # dead child's replacement then completes the message with how the child died
    message = wait_until(
        lambda: "(last: killed by SIGKILL" in given_up(lab) and given_up(lab), 120, message="the poison job given up"
    )
    assert message.startswith(
        f"{GAVE_UP}3 attempts: the worker process died 3 times running this job (last: killed by SIGKILL"
    ), message
    # (its RSS is in the message when the supervisor sampled the child before it died: not this one, dying at once)
    wait_until(lambda: others_done(lab), 60, message="every other key")
    assert sup.output.count("died in a job") == 3  # one child per attempt, no more
    assert attempts(db, lab) == 0  # given up: an operator's retry starts afresh
    sup.wait_children({"standard": 2})
    assert_clean_stop(sup)


def test_a_job_that_always_hits_a_transient_error_is_given_up_with_its_count(db, supervise, tmp_path):
    lab = seed(db, fail="Lost connection to MySQL server during query")
    sup = supervise(["-c", config(tmp_path)])
    message = wait_until(lambda: given_up(lab), 120, message="the poison job given up")
    assert message.startswith(f"{GAVE_UP}3 attempts: a transient error 3 times (last: "), message
    assert "Lost connection to MySQL server during query" in message
    wait_until(lambda: others_done(lab), 60, message="every other key")
    assert "died in a job" not in sup.output
    assert_clean_stop(sup)


def test_a_hung_job_times_out_max_attempts_times_then_stays_error(db, supervise, tmp_path):
    lab = seed(db, hang=1)
    sup = supervise(["-c", config(tmp_path, pool="job_timeout = 2")])
    # as with a job that kills its process: a sibling's recovery may give the job up first with the generic
    # reason, and the dead child's replacement then completes it (milliseconds later)
    message = wait_until(lambda: timed_out(given_up(lab)), 150, message="the hung job given up")
    assert message == f"{GAVE_UP}3 attempts: timed out 3 times after 2 s", message
    wait_until(lambda: others_done(lab), 60, message="every other key")
    assert sup.output.count("job_timeout 2 s; killing") == 3, sup.output
    assert_clean_stop(sup)
    assert given_up(lab) == message  # nothing re-pended it


def test_attempts_survive_a_restart_and_are_shared_by_two_hosts(db, supervise, tmp_path):
    lab = seed(db, kill=1)
    # after its first death the key waits an hour
    first = supervise(["-c", config(tmp_path, name="node-a", retry_delay=3600)], uts_host="node-a")
    wait_until(lambda: attempts(db, lab) == 1 and poison_job(lab).get("status") == "pending", 90, message="a death")
    wait_until(lambda: others_done(lab), 60, message="every other key")
    assert_clean_stop(first)
    assert attempts(db, lab) == 1  # kept across the stop
    # an hour later (moved by hand), on another machine: two more deaths and the job is given up
    q = db.connection.adapter.quote_identifier
    db.connection.query(
        f"UPDATE {lab.Square.jobs.full_table_name} SET {q('scheduled_time')}=CURRENT_TIMESTAMP(3) "
        f"WHERE {q('source_id')}=%s",
        args=(POISON["source_id"],),
    )
    second = supervise(["-c", config(tmp_path, name="node-b")], uts_host="node-b")
    message = wait_until(lambda: given_up(lab), 120, message="the poison job given up on node-b")
    assert message.startswith(f"{GAVE_UP}3 attempts: the worker process died 3 times"), message
    assert second.output.count("died in a job") == 2
    assert_clean_stop(second)
