"""A worker's queue refresh writes its new jobs in batches (DataJoint 2.3 inserts them one statement each):
every key queued once, pending and runnable, and on MySQL/MariaDB a handful of INSERTs for thousands of keys,
counted by the server for the worker's own session."""

from __future__ import annotations

import pytest
from pipelines.lab import declare

from djsupervisor import DataJointWorker
from djsupervisor.worker import compat

pytestmark = pytest.mark.timeout(180)

KEYS = 12_000


def session_inserts(connection) -> int:
    return int(connection.query("SHOW SESSION STATUS LIKE 'Com_insert'").fetchone()[1])


def test_a_first_refresh_queues_thousands_of_keys_in_a_few_statements(db):
    lab = declare(db.schema_name("pipe"))
    lab.Source.insert(
        [dict(source_id=i, value=float(i)) for i in range(1, KEYS + 1)], skip_duplicates=True
    )  # one statement: the test's own setup
    jobs = lab.Square.jobs
    jobs.refresh(f"source_id <= {KEYS // 4}")  # some keys already queued, DataJoint's own way
    connection = lab.Square.connection
    before = session_inserts(connection) if db.backend == "mysql" else 0
    with compat.bulk_refresh(jobs):
        result = jobs.refresh()
    assert result["added"] == KEYS - KEYS // 4
    assert jobs.progress()["pending"] == KEYS
    if db.backend == "mysql":
        inserts = session_inserts(connection) - before
        assert inserts <= -(-(KEYS - KEYS // 4) // compat.REFRESH_INSERT_BATCH) + 1, inserts  # not 9,000
    # a worker's cycle refreshes that way too, and works the queue it made
    worker = DataJointWorker("bulk", db.schema_name("workers"), sleep_duration=0)
    worker(lab.Square, max_calls=5)
    lab.Source.insert([dict(source_id=KEYS + 1, value=1.0)])
    summary = worker.run_once()
    assert summary.jobs_done == 5
    assert jobs.progress()["pending"] == KEYS + 1 - 5
    assert not hasattr(jobs, "insert1") or "insert1" not in vars(jobs)  # DataJoint's own method uncovered
