"""What DataJointWorker refuses at registration, what it keeps on a step, and the transient errors it clears by
default (datajoint-utilities' built-in patterns among them), on both backends."""

from __future__ import annotations

import datajoint as dj
import pytest
from pipelines.lab import declare

from djsupervisor import DataJointWorker

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def pipe(db):
    return declare(db.schema_name("pipe"))


def new_worker(db) -> DataJointWorker:
    # retry_delay 0: a cleared error may be worked again at once (by default it waits 10 s)
    return DataJointWorker("reg", db.schema_name("workers"), db_prefix=db.prefix, sleep_duration=0, retry_delay=0)


def test_tables_that_are_not_auto_populated_are_refused(db, pipe):
    worker = new_worker(db)
    with pytest.raises(TypeError, match=r"^cannot register Source: a Manual table is not auto-populated \("):
        worker(pipe.Source)
    with pytest.raises(TypeError, match="cannot register Source: a Manual table"):
        worker(pipe.Source())
    with pytest.raises(TypeError, match="cannot register Digit: a Part table is not auto-populated"):
        worker(pipe.Cube.Digit)

    schema = dj.Schema(db.schema_name("lookup"))

    @schema
    class Shape(dj.Lookup):
        definition = """
        shape : varchar(16)
        """

    with pytest.raises(TypeError, match="cannot register Shape: a Lookup table is not auto-populated"):
        worker(Shape)

    class Loose(dj.Computed):  # never decorated: no schema, no table
        definition = """
        loose_id : int32
        """

    with pytest.raises(ValueError, match="^cannot register Loose: its class is not bound to a schema"):
        worker(Loose)
    assert worker.processes == []


@pytest.mark.parametrize("argument", ["reserve_jobs", "suppress_errors"])
def test_populate_arguments_the_worker_cannot_honour_are_refused(db, pipe, argument):
    worker = new_worker(db)
    with pytest.raises(ValueError, match=rf"^cannot register .*__square.* with {argument}=False: a worker always"):
        worker(pipe.Square, **{argument: False})
    worker(pipe.Square, **{argument: True}, max_calls=5)  # what the worker does anyway: accepted
    assert worker._steps[0].populate_kwargs == {"max_calls": 5}


def test_notify_on_stays_on_the_step_and_never_reaches_populate(db, pipe):
    pipe.seed([1, 2])
    calls = []
    worker = new_worker(db)
    worker(pipe.Square, notify_on=["error", "Success"])
    worker(lambda **kwargs: calls.append(kwargs), notify_on="error", channel="#lab")
    worker(pipe.Cube)
    summary = worker.run_once()
    assert summary.jobs_done == 4 and summary.jobs_failed == 0  # populate() was not handed notify_on
    assert calls == [{"channel": "#lab"}]
    assert [step.notify_on for step in worker._steps] == [("error", "success"), ("error",), ()]
    assert worker.configure()._steps[0].notify_on == ("error", "success")
    with pytest.raises(ValueError, match=r"notify_on must be a list of start, success, error, got 3"):
        worker(pipe.Square, notify_on=3)


UPSTREAM_TRANSIENT = {
    1: "MaxRetryError: HTTPSConnectionPool(host='s3.example.org', port=443): Max retries exceeded",
    2: "InternalError: (1205, 'Lock wait timeout exceeded; try restarting transaction')",
    3: "LostConnectionError: Server connection lost",
    4: "SystemExit: SIGTERM received",
    5: "Interrupted by KeyboardInterrupt",
    6: "OperationalError: (1213, 'Deadlock found when trying to get lock')",
    7: "ValueError: a real bug",  # stays an error
}


def test_upstreams_builtin_transient_errors_are_cleared_by_default(db, pipe):
    pipe.seed(UPSTREAM_TRANSIENT)
    pipe.Square.jobs.refresh()
    for source_id, message in UPSTREAM_TRANSIENT.items():
        pipe.Square.jobs.error(dict(source_id=source_id), error_message=message, error_stack="stack")
    worker = new_worker(db)
    worker(pipe.Square)
    summary = worker.run_once()  # recovery first, then the re-pended jobs are worked in the same cycle
    assert summary.cleared_errors == 6
    assert {k["source_id"] for k in pipe.Square.keys()} == set(range(1, 7))
    assert [k["source_id"] for k in pipe.Square.jobs.errors.keys()] == [7]
    cleared = worker.schema.tables["ErrorLog"]() & "kind='cleared'"
    assert sorted(r["error_message"] for r in cleared.to_dicts()) == sorted(
        m for k, m in UPSTREAM_TRANSIENT.items() if k != 7
    )
