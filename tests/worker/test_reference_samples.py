"""Every code sample of the DataJoint Worker reference (shared/reference/datajoint-worker.md) works as
written: the import line aside, placeholders filled with test tables, endless loops ended from outside.

Each sample's body below is the reference's text with only the placeholders replaced: "my_worker" stays,
"worker_schema" becomes this test's worker schema, ["my_db"] this test's prefix, my_table1..3 the test
pipeline's tables, my_custom_function a function. The loop is ended by a thread that calls stop() once the
sample's worker has done the expected work (the samples sleep 60 s between cycles: stop() ends the sleep).
"""

from __future__ import annotations

import threading

import pytest
from jobtools import wait_until
from pipelines.lab import declare

from djsupervisor import DataJointWorker

pytestmark = pytest.mark.timeout(90)


def stop_when(worker_ref: dict, predicate, timeout: float = 45) -> threading.Thread:
    """Start a thread that waits for `predicate()` and then stops the worker in worker_ref["worker"]."""

    def watch():
        wait_until(lambda: "worker" in worker_ref and predicate(), timeout, message="sample to do its work")
        worker_ref["worker"].stop("test: sample did its work")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def pipe(db):
    p = declare(db.schema_name("pipe"))
    p.seed(range(1, 5))
    return p


def test_basic_usage(db, pipe):
    worker_schema = db.schema_name("worker_schema")
    ran = []
    ref = {}
    stop_when(ref, lambda: ran and ref["worker"].activity.state == "sleeping")

    # ---- sample: Basic Usage
    @DataJointWorker("my_worker", worker_schema)
    def my_process():
        # Your pipeline process here
        ran.append(1)
        pipe.Square.populate()  # (the placeholder's body: some pipeline work)

    ref["worker"] = my_process
    # Run the worker
    my_process.run()
    # ---- end of sample

    assert isinstance(my_process, DataJointWorker)
    assert len(ran) == 1 and len(pipe.Square()) == 4  # one cycle, then the 60 s sleep was cut short


def test_advanced_configuration(db, pipe):
    worker_schema = db.schema_name("worker_schema")
    db_prefix = db.prefix
    ran = []
    ref = {}
    stop_when(ref, lambda: len(ran) >= 1)

    # ---- sample: Advanced Configuration
    @DataJointWorker(
        "my_worker",
        worker_schema,
        run_duration=3600,  # Run for 1 hour
        sleep_duration=60,  # Sleep 60 seconds between cycles
        max_idled_cycle=10,  # Stop after 10 idle cycles
        stale_timeout_hours=24,  # Consider jobs stale after 24 hours
        autoclear_error_patterns=["%Deadlock%", "%Lock wait timeout%"],
        db_prefix=[db_prefix],
    )
    def my_process():
        # Your pipeline process here
        ran.append(1)

    ref["worker"] = my_process
    my_process.run()
    # ---- end of sample

    assert my_process.run_duration == 3600 and my_process.max_idled_cycle == 10
    assert my_process.db_prefix == (db.prefix,)
    assert ran


def test_imperative_usage(db, pipe):
    worker_schema = db.schema_name("worker_schema")
    my_table1, my_table2, my_table3 = pipe.Square, pipe.Cube, pipe.Square
    calls = []

    def my_custom_function():
        calls.append(len(pipe.Cube()))

    ref = {}
    stop_when(ref, lambda: len(calls) >= 1)

    # ---- sample: Imperative Usage
    # Create a worker instance
    worker = DataJointWorker("my_worker", worker_schema, run_duration=3600, sleep_duration=60, stale_timeout_hours=24)
    ref["worker"] = worker

    # Add processes to the worker
    worker(my_table1)  # Add a DataJoint table
    worker(my_table2)  # Add another table
    worker(my_custom_function)  # Add a custom function
    worker(my_table3)  # Add another table

    # Run the worker
    worker.run()
    # ---- end of sample

    assert calls[0] == 4  # both tables ran, in order, before the function
    assert len(pipe.Cube()) == 4
    assert worker.processes[:3] == [
        pipe.Square().full_table_name,
        pipe.Cube().full_table_name,
        f"{__name__}.test_imperative_usage.<locals>.my_custom_function",
    ]


def test_worker_schema_has_the_reference_tables(db, pipe):
    worker = DataJointWorker("my_worker", db.schema_name("worker_schema"), sleep_duration=0)
    worker(pipe.Square)
    worker.run_once()
    assert set(worker.schema.tables) == {
        "RegisteredWorker",
        "WorkerLog",
        "ErrorLog",
        "FleetFlag",
        "JobAttempt",
        "RefreshLease",
    }
