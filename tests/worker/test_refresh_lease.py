"""One refresh of a table's job queue per interval across the fleet: of two workers (two sessions, as on two
hosts) sharing a worker schema, the first cycle refreshes and the second works the queue as it stands; once
the interval has passed (moved back by hand), the next cycle refreshes again; the claim is one statement."""

from __future__ import annotations

import pytest
from jobtools import open_connection
from pipelines.lab import declare

from djsupervisor import DataJointWorker
from djsupervisor.worker import steps
from djsupervisor.worker.refresh_lease import HOLD_SECONDS, end_refresh, take_refresh_lease
from djsupervisor.worker.schema import WorkerSchema

pytestmark = pytest.mark.timeout(120)


def worker(db, name: str, lab, **settings) -> DataJointWorker:
    w = DataJointWorker(name, db.schema_name("workers"), sleep_duration=60, **settings)
    w(lab.Square, max_calls=1)
    return w


def lease_table(db) -> str:
    return WorkerSchema(db.schema_name("workers"), db.connection).tables["RefreshLease"].full_table_name


def age_the_lease(db, seconds: int) -> None:
    q = db.connection.adapter.quote_identifier
    interval = db.connection.adapter.interval_expr(seconds, "second")
    db.connection.query(f"UPDATE {lease_table(db)} SET {q('refreshed_at')} = {q('refreshed_at')} - {interval}")


def test_one_refresh_per_table_and_interval_across_workers(db):
    lab = declare(db.schema_name("pipe"))
    lab.seed(range(1, 4))
    first, second = worker(db, "a", lab), worker(db, "b", lab)
    assert first.run_once().jobs_done == 1  # refreshed: 3 keys queued, 1 done
    assert lab.Square.jobs.progress()["pending"] == 2
    lab.seed(range(4, 7))  # new keys
    assert second.run_once().jobs_done == 1  # within the interval: the queue as it stands, no refresh
    assert len(lab.Square.jobs) == 1 and lab.Square.jobs.progress()["pending"] == 1  # the new keys not queued
    age_the_lease(db, 61)
    assert second.run_once().jobs_done == 1  # the interval passed: this one refreshes
    assert lab.Square.jobs.progress()["pending"] == 3  # 1 left + 3 new - 1 done
    rows = (WorkerSchema(db.schema_name("workers"), db.connection).tables["RefreshLease"]()).to_dicts()
    assert [r["table_name"] for r in rows] == [lab.Square().full_table_name]


def test_refresh_interval_zero_refreshes_every_cycle(db):
    lab = declare(db.schema_name("pipe"))
    lab.seed(range(1, 3))
    w = worker(db, "a", lab, refresh_interval=0)
    w.run_once()
    lab.seed(range(3, 5))
    w.run_once()
    assert len(lab.Square.jobs) + len(lab.Square()) == 4  # every key queued (or done) by the second refresh


def test_the_claim_goes_to_exactly_one_session(db):
    lab = declare(db.schema_name("pipe"))
    table, target = lease_table(db), lab.Square().full_table_name
    sessions = [db.connection, open_connection(db), open_connection(db)]
    assert [take_refresh_lease(c, table, target, 30) for c in sessions] == [True, False, False]
    age_the_lease(db, int(HOLD_SECONDS) + 31)  # never ended: held, then the interval
    assert [take_refresh_lease(c, table, target, 30) for c in reversed(sessions)] == [True, False, False]
    assert take_refresh_lease(sessions[1], table, target, 0)  # no interval: always
    for connection in sessions[1:]:
        connection.close()


def hand_the_lease_to(db, holder: str) -> None:
    q = db.connection.adapter.quote_identifier
    db.connection.query(f"UPDATE {lease_table(db)} SET {q('refreshed_by')} = %s", args=(holder,))


def test_the_lease_is_held_until_the_refresh_ends(db):
    """A refresher holds the lease until `end_refresh` (its new jobs written), however long past the interval;
    the interval then runs from the end; `end_refresh` of a lease another process holds changes nothing; a
    refresher that never ends it (it died) loses it once the hold and then the interval are over."""
    lab = declare(db.schema_name("pipe"))
    table, target = lease_table(db), lab.Square().full_table_name
    other = open_connection(db)
    try:
        assert take_refresh_lease(db.connection, table, target, 1, hold=30)
        age_the_lease(db, 5)  # 5 s into a refresh, with a 1 s interval: still held
        assert not take_refresh_lease(other, table, target, 1, hold=30)
        end_refresh(db.connection, table, target)
        assert not take_refresh_lease(other, table, target, 3600)  # ended just now: not an hour ago
        age_the_lease(db, 2)
        assert take_refresh_lease(other, table, target, 1, hold=30)  # the interval ran from the end
        hand_the_lease_to(db, "elsewhere:1")
        end_refresh(db.connection, table, target)  # not ours any more: still held
        age_the_lease(db, 5)
        assert not take_refresh_lease(other, table, target, 1, hold=30)
        age_the_lease(db, 27)  # the holder died: 32 s after its claim, past the hold and the interval
        assert take_refresh_lease(db.connection, table, target, 1, hold=30)
    finally:
        other.close()


def lease_during_the_first_job(db, lab, w: DataJointWorker, age: int) -> tuple[int, list[tuple[bool, int]]]:
    """Run one cycle of `w`; at its first job, `age` seconds on, could another session take the lease (interval
    0.01 s), and how many jobs were queued then: (jobs done, [(taken, queued)])."""
    table, target = lease_table(db), lab.Square().full_table_name
    other = open_connection(db)
    seen: list[tuple[bool, int]] = []

    def first_job(event) -> None:  # (a listener's exception is logged, not raised: record, assert later)
        if event.kind == "job_start" and not seen:
            queued = len(lab.Square.jobs)
            age_the_lease(db, age)
            seen.append((take_refresh_lease(other, table, target, 0.01), queued))

    w.add_listener(first_job)
    try:
        return w.run_once().jobs_done, seen
    finally:
        other.close()


def test_no_second_refresh_while_the_first_writes_its_new_jobs(db, monkeypatch):
    """A refresh with more new keys than it writes before the first job holds the lease through that job, until
    the rest is written (before: the lease went to the next worker one interval after the claim, and it wrote
    the same new keys again); the lease is handed back in the same cycle."""
    monkeypatch.setattr(steps, "REFRESH_FIRST_ROWS", 2)
    lab = declare(db.schema_name("pipe"))
    lab.seed(range(1, 8))
    w = DataJointWorker("a", db.schema_name("workers"), sleep_duration=60, refresh_interval=0.01)
    w(lab.Square)  # no max_calls: the batches (a one-call populate is covered by the first test)
    _, seen = lease_during_the_first_job(db, lab, w, age=5)
    assert seen == [(False, 2)]  # held, and the rest of the new jobs not written yet
    assert len(lab.Square.jobs) + len(lab.Square()) == 7  # every new key queued (or done) by this cycle
    age_the_lease(db, 1)
    assert take_refresh_lease(db.connection, lease_table(db), lab.Square().full_table_name, 0.01)  # handed back


def test_a_refresh_without_a_rest_to_write_hands_the_lease_back_before_the_first_job(db):
    """Jobs may take hours: the lease is not held through them when the refresh has written every new job."""
    lab = declare(db.schema_name("pipe"))
    lab.seed(range(1, 4))
    w = DataJointWorker("a", db.schema_name("workers"), sleep_duration=60, refresh_interval=0.01)
    w(lab.Square)
    done, seen = lease_during_the_first_job(db, lab, w, age=1)
    assert done == 3 and seen == [(True, 3)]
