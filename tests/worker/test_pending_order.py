"""Each worker walks the pending keys in its own order (`djsupervisor.worker.pending_order`): two processes
working one queue lose few reservations to each other, where DataJoint's own populate(), walking the keys in
the same order in both, loses about one per job; a better priority still goes first; a worker's first job
does not wait for the whole of a big first refresh to be written."""

from __future__ import annotations

import json
import time

import pytest
from helpers import run_scripts
from pipelines.lab import declare

from djsupervisor import DataJointWorker
from djsupervisor.worker import compat, steps

pytestmark = pytest.mark.timeout(180)

KEYS = 200


def contend(db, mode: str) -> list[dict]:
    """Two processes of `mode` working the queued keys from the same instant: what each did."""
    start_at = str(time.time() + 5)
    outputs = run_scripts(db.env, "contend_worker.py", [[db.prefix, start_at, mode]] * 2, timeout=120)
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def test_two_workers_on_one_table_lose_few_reservations_where_plain_populate_loses_one_per_job(db):
    lab = declare(db.schema_name("pipe"))
    lab.seed(range(1, KEYS + 1), delay=0.01)
    lab.Square.jobs.refresh()  # queued for both: neither process refreshes
    plain = contend(db, "plain")
    assert sum(p["done"] for p in plain) == KEYS
    assert sum(p["lost"] for p in plain) >= KEYS // 2, plain  # the baseline: the same order in both
    (lab.Square & "source_id > 0").delete_quick()
    lab.Square.jobs.delete_quick()
    lab.Square.jobs.refresh()
    own = contend(db, "worker")
    assert sum(p["done"] for p in own) == KEYS
    assert min(p["done"] for p in own) >= KEYS // 4, own  # both worked (not one giving up on a stale list)
    assert sum(p["lost"] for p in own) <= KEYS // 5, own  # DataJoint's order again would lose ~KEYS


def test_a_better_priority_goes_first_in_a_worker_s_own_order(db):
    lab = declare(db.schema_name("pipe"))
    lab.seed(range(1, 61))
    jobs = lab.Square.jobs
    jobs.refresh("source_id > 20", priority=5)
    jobs.refresh("source_id <= 20", priority=1)
    worker = DataJointWorker("order", db.schema_name("workers"), sleep_duration=0, refresh_interval=60)
    worker(lab.Square)
    started: list[int] = []
    worker.add_listener(lambda event: started.append(event.key["source_id"]) if event.kind == "job_start" else None)
    summary = worker.run_once()
    assert summary.jobs_done == 60 and summary.reservations_lost == 0
    assert sorted(started[:20]) == list(range(1, 21))  # priority 1 first
    assert started[:20] != sorted(started[:20]) or started[20:] != sorted(started[20:])  # not DataJoint's order


def test_the_first_job_starts_before_a_big_first_refresh_is_written(db):
    keys = 2 * compat.REFRESH_INSERT_BATCH + 10
    lab = declare(db.schema_name("pipe"))
    lab.Source.insert([dict(source_id=i, value=float(i)) for i in range(1, keys + 1)])
    worker = DataJointWorker("first", db.schema_name("workers"), sleep_duration=0)
    worker(lab.Square, max_calls=3)
    queued_at_first_job: list[int] = []
    worker.add_listener(
        lambda event: (
            queued_at_first_job.append(len(lab.Square.jobs))
            if event.kind == "job_start" and not queued_at_first_job
            else None
        )
    )
    assert worker.run_once().jobs_done == 3
    assert queued_at_first_job == [steps.REFRESH_FIRST_ROWS]  # the first rows, not every new key
    assert lab.Square.jobs.progress()["pending"] == keys - 3  # the rest written in the same cycle


def test_a_stop_during_the_first_jobs_does_not_wait_for_the_rest_of_the_refresh(db):
    """The rest of a big first refresh is dropped at a stop (it would delay the exit by seconds) and queued
    by the next refresh: no key is lost."""
    keys = 2 * compat.REFRESH_INSERT_BATCH + 10
    lab = declare(db.schema_name("pipe"))
    lab.Source.insert([dict(source_id=i, value=float(i)) for i in range(1, keys + 1)])
    worker = DataJointWorker("first", db.schema_name("workers"), sleep_duration=0)
    worker(lab.Square)
    worker.add_listener(lambda event: worker.stop("test") if event.kind == "job_start" else None)
    assert worker.run_once().jobs_done == 1
    # the first rows only (less the job done: a completed job's row is deleted), the rest not written
    assert len(lab.Square.jobs) == steps.REFRESH_FIRST_ROWS - 1
    worker = DataJointWorker("next", db.schema_name("workers"), sleep_duration=0, refresh_interval=0)
    worker(lab.Square, max_calls=1)
    worker.run_once()
    assert lab.Square.jobs.progress()["pending"] == keys - 2  # the next refresh queued every other key


def test_the_rest_of_a_big_first_refresh_is_written_right_after_the_first_job(db):
    """Not after a whole first call of 250 jobs: a child that dies or is recycled before that would leave the
    rest to the next refresh's anti-join of every key, again and again."""
    keys = 2 * compat.REFRESH_INSERT_BATCH + 10
    lab = declare(db.schema_name("pipe"))
    lab.Source.insert([dict(source_id=i, value=float(i)) for i in range(1, keys + 1)])
    worker = DataJointWorker("first", db.schema_name("workers"), sleep_duration=0)
    worker(lab.Square)
    queued: list[int] = []

    def count(event) -> None:
        if event.kind == "job_start":
            queued.append(len(lab.Square.jobs))
            if len(queued) == 2:
                worker.stop("test")

    worker.add_listener(count)
    worker.run_once()
    assert queued == [steps.REFRESH_FIRST_ROWS, keys - 1]  # the first rows; every key (less the job done)
