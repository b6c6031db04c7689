"""djsupervisor.dj_worker against datajoint-utilities' documented behaviour, in process, on both backends.

The lab-style module `pipelines.lab_worker` is imported fresh for each test, under the test's schema prefix;
its runner and `djsupervisor start` run it in test_dj_worker_runner.py.
"""

from __future__ import annotations

import datetime
import importlib
import math
import sys
import time
import uuid
import warnings

import pytest

import djsupervisor.dj_worker.worker as compat_worker
from djsupervisor import DataJointWorker as BaseWorker
from djsupervisor.dj_worker import (
    DataJointWorker,
    ErrorLog,
    RegisteredWorker,
    UpstreamSemanticsWarning,
    WorkerLog,
    get_key_source_count,
    get_workers_progress,
    get_workflow_operation_overview,
    is_djtable,
    worker_schema,
)
from djsupervisor.dj_worker.utils import get_workflow_operation_overview as from_utils
from djsupervisor.dj_worker.worker_schema import is_djtable as from_worker_schema

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def unbound_tables():
    """The module-level tables speak for no worker before a test and after it (each test has its own schemas)."""
    yield
    worker_schema.context.created = worker_schema.context.running = None
    for table in (RegisteredWorker, WorkerLog, ErrorLog):
        table._bound_to = None


@pytest.fixture
def lab_worker(db, monkeypatch):
    """`pipelines.lab_worker`, imported now under this test's prefix (its workers and its pipeline)."""
    monkeypatch.setenv("DJS_TEST_PREFIX", db.prefix)
    sys.modules.pop("pipelines.lab_worker", None)
    module = importlib.import_module("pipelines.lab_worker")
    module.standard_worker._sleep_duration = 0
    module.cube_worker._sleep_duration = 0
    yield module
    sys.modules.pop("pipelines.lab_worker", None)


def test_lab_module_imports_with_upstreams_names(lab_worker):
    assert set(lab_worker.__all__) == {"standard_worker", "cube_worker", "WorkerLog", "ErrorLog"}
    worker = lab_worker.standard_worker
    assert isinstance(worker, BaseWorker) and isinstance(worker, DataJointWorker)
    assert [kind for kind, _, _ in worker._processes_to_run] == ["function", "dj_table"]
    assert worker._processes_to_run[1][2] == {"max_calls": 10}
    assert worker._db_prefix == [lab_worker.db_prefix] and lab_worker.cube_worker.db_prefix == (lab_worker.db_prefix,)
    assert worker._autoclear_error_patterns == ["%FileNotFound%"]
    assert worker._run_duration == -1 and worker._stale_timeout_hours == 24
    assert is_djtable(lab_worker.lab.Square) and is_djtable(lab_worker.lab.Source())
    assert not is_djtable(lab_worker.auto_check_sources) and from_worker_schema is is_djtable
    assert from_utils is get_workflow_operation_overview


def test_run_duration_assignment_ends_the_run(lab_worker):
    worker = lab_worker.cube_worker
    worker._run_duration = None  # parse_args' value when -d was not given: the worker's own stands
    assert worker._run_duration == -1
    worker._run_duration, worker._sleep_duration, worker._max_idled_cycle = 1, 0.2, -1
    began = time.monotonic()
    worker.run()
    assert 1 <= time.monotonic() - began < 20
    assert worker.cycles >= 2 and worker.activity.state == "stopped"
    with pytest.raises(ValueError, match="sleep_duration must be >= 0, got -1"):
        worker._sleep_duration = -1
    with pytest.raises(ValueError, match="run_duration must be a number, got 'long'"):
        worker._run_duration = "long"


def test_run_once_returns_upstreams_count(lab_worker):
    lab_worker.lab.seed([1, 2, 3])
    lab_worker.lab.seed([4], fail="bad source 4")
    worker = lab_worker.standard_worker
    assert worker._run_once() == 4  # jobs done or failed by its tables; the callable is not counted
    assert worker._run_once() == 0


def test_log_exception_rows_are_queryable_through_the_module_level_error_log(db, lab_worker):
    lab_worker.lab.seed([-1, -2, 3])
    lab_worker.standard_worker.run_once()  # cube_worker was made last: the running worker's name is used
    logged = ErrorLog & {"kind": "exception"}
    assert len(logged) == 2
    rows = logged.to_dicts(order_by="error_time")
    assert {r["key"]["source_id"] for r in rows} == {-1, -2}
    assert {r["worker_name"] for r in rows} == {"standard_worker"}
    assert {r["error_message"] for r in rows} == {
        "ValueError: source -1 has a negative value",
        "ValueError: source -2 has a negative value",
    }
    assert all("raise ValueError" in r["error_stack"] for r in rows)
    assert rows[0]["process"] == "pipelines.lab_worker.auto_check_sources"
    assert len(ErrorLog & "worker_name='standard_worker'" & {"kind": "exception"}) == 2
    assert ErrorLog.full_table_name.replace("`", "").replace('"', "") == f"{db.prefix}_workerlog.error_log"

    lab_worker.standard_worker.run_once()  # logged again: ErrorLog keeps history (upstream updated the row)
    assert len(ErrorLog & {"kind": "exception"}) == 4
    ErrorLog.log_exception({"source_id": 7}, lab_worker.auto_check_sources, "just text")  # outside a cycle
    row = (ErrorLog & "error_message='just text'").to_dicts()[0]
    assert row["worker_name"] == "cube_worker" and row["key"] == {"source_id": 7}  # the last worker made


def test_error_log_log_error_job_takes_upstream_and_datajoint2_rows(db, lab_worker):
    lab_worker.standard_worker.run_once()
    when = datetime.datetime(2024, 5, 1, 12, 0, 0)
    upstream = dict(
        table_name="__square",
        key={"source_id": 5},
        key_hash="x" * 32,
        timestamp=when,
        error_message="OSError: disk",
        error_stack="stack",
        host="node-7",
        user="u",
        pid=42,
    )
    ErrorLog.log_error_job(upstream, schema_name=f"{db.prefix}_pipe", db_prefix=[lab_worker.db_prefix])
    row = (ErrorLog & {"kind": "job"} & "host='node-7'").to_dicts()[0]
    assert row["key"] == {"source_id": 5} and row["pid"] == 42 and row["error_time"] == when
    assert row["process"] == lab_worker.lab.Square.full_table_name and row["error_message"] == "OSError: disk"
    modern = dict(table_name="__square", source_id=6, status="error", error_message="IOError", pid=0, host="")
    ErrorLog.log_error_job(modern, schema_name=f"{db.prefix}_pipe")
    assert (ErrorLog & "error_message='IOError'").to_dicts()[0]["key"] == {"source_id": 6}
    with pytest.raises(ValueError, match="^ErrorLog.log_error_job: error_entry needs a 'table_name'"):
        ErrorLog.log_error_job({"source_id": 6}, schema_name=f"{db.prefix}_pipe")


def test_worker_log_classmethods_and_delete_old_logs(db, lab_worker):
    lab_worker.lab.seed([1])
    lab_worker.standard_worker.run_once()
    WorkerLog.log_process_job(lab_worker.lab.Cube, worker_name="notebook")
    square = lab_worker.lab.Square.full_table_name
    recent = {r["process"]: r for r in WorkerLog.get_recent_jobs(backtrack_minutes=10).to_dicts()}
    assert recent[square]["worker_count"] == 1 and recent[square]["minutes_since_newest"] == 0
    assert lab_worker.lab.Cube.full_table_name in recent
    assert len(WorkerLog & {"worker_name": "notebook", "cycle": 0}) == 1

    old = datetime.datetime.now() - datetime.timedelta(days=40)
    row = (WorkerLog & {"process": square}).to_dicts()[0]
    WorkerLog.insert1(dict(row, log_id=uuid.uuid4().hex, log_time=old))
    ErrorLog.log_exception({"source_id": 1}, lab_worker.auto_check_sources, "old news")
    ErrorLog.log_exception({"source_id": 2}, lab_worker.auto_check_sources, "new news")
    error = (ErrorLog & "error_message='old news'").to_dicts()[0]
    (ErrorLog & {"error_id": error["error_id"]}).delete_quick()
    ErrorLog.insert1(dict(error, error_time=old))
    before = len(WorkerLog())
    recent = {r["process"]: r for r in WorkerLog.get_recent_jobs(backtrack_minutes=60 * 24 * 50).to_dicts()}
    assert recent[square]["minutes_since_oldest"] >= 40 * 24 * 60 - 1
    assert WorkerLog.delete_old_logs(cutoff_days=30) == 1 and len(WorkerLog()) == before - 1
    assert ErrorLog.delete_old_logs(30) == 1
    assert len(ErrorLog & "error_message='new news'") == 1 and WorkerLog.delete_old_logs() == 0
    with pytest.raises(ValueError, match="cutoff_days must be a number"):
        ErrorLog.delete_old_logs("30")


def test_overview_reports_total_and_remaining_from_the_key_source(db, lab_worker):
    lab = lab_worker.lab
    lab.seed(range(1, 6))
    lab.seed([6], fail="bad source 6")
    lab_worker.standard_worker.run_once()
    lab.seed([7, 8, 9])  # in the key source, not yet populated
    lab.Square.jobs.refresh()
    assert lab.Square.jobs.reserve(dict(source_id=9))
    lab_worker.cube_worker.run_once()
    schema = f"{db.prefix}_workerlog"

    overview = get_workflow_operation_overview(schema, db_prefixes=[lab_worker.db_prefix])
    assert list(overview.columns) == ["worker_name", "total", "incomplete", "reserved", "error", "ignore", "remaining"]
    assert overview.index.name == "process"
    square = overview.loc["pipe.Square"]
    assert square.worker_name == "standard_worker"
    assert (square.total, square.incomplete, square.reserved, square.error, square.ignore) == (9, 4, 1, 1, 0)
    assert square.remaining == 2
    cube = overview.loc["pipe.Cube"]
    assert cube.worker_name == "cube_worker" and (cube.total, cube.incomplete, cube.remaining) == (5, 0, 0)

    excluded = get_workflow_operation_overview(schema, db_prefixes=lab_worker.db_prefix, exclude_tables=["Cube"])
    assert math.isnan(excluded.loc["pipe.Cube"].total) and excluded.loc["pipe.Square"].total == 9
    assert get_workflow_operation_overview(schema, db_prefixes=["elsewhere_"]).empty
    assert get_workflow_operation_overview(f"{db.prefix}_nothing").empty

    progress = get_workers_progress(RegisteredWorker, db.connection, worker_name="cube_worker")
    assert list(progress.index) == ["pipe.Cube"]
    total_sql, incomplete_sql = get_key_source_count(
        db.connection, lab.Square.key_source.proj().make_sql(), lab.Square.full_table_name, return_sql=True
    )
    assert total_sql.startswith("SELECT * FROM (") and "NOT EXISTS" in incomplete_sql
    restricted = get_key_source_count(
        db.connection, lab.Square.key_source.proj().make_sql(), lab.Square.full_table_name, ["source_id > 4"]
    )
    assert restricted == (5, 4)
    with pytest.warns(DeprecationWarning, match="get_workers_progress"):
        assert len(RegisteredWorker.get_workers_progress()) == 2


def test_upstream_constructor_arguments(db, monkeypatch):
    monkeypatch.setattr(compat_worker, "_warned", set())  # warnings are once per process
    name = db.schema_name("workerlog")
    with pytest.warns(DeprecationWarning, match="remove_stale_reserved_jobs"):
        worker = DataJointWorker("w", name, remove_stale_reserved_jobs=True, run_duration=None)
    assert worker.run_duration == -1 and worker.stale_timeout_hours == 24 and worker.db_prefix is None
    with pytest.warns(UpstreamSemanticsWarning, match="keeps 24 hours"):
        worker = DataJointWorker("w", name, stale_timeout_hours=0, db_prefix="lab_")
    assert worker.stale_timeout_hours == 24 and worker._db_prefix == ["lab_"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DataJointWorker("w", name, stale_timeout_hours=-1)  # warned once per process, not per worker
    with pytest.warns(UpstreamSemanticsWarning, match="run_duration=0 ran no cycle") as caught:
        worker = DataJointWorker("w", name, run_duration=0)
    assert caught[0].filename == __file__  # the warning points at the lab's line
    worker._run_duration = 0  # warned already

    class Notifier:
        def notify(self, **_):
            pass

    notifier = Notifier()
    worker = DataJointWorker("w", name, notifiers=[notifier], sleep_duration=5)
    worker.add_step(print, notify_on=["Error"])
    worker.add_step(len, position_=0)
    assert worker.processes == ["builtins.len", "builtins.print"]
    assert worker._steps[1].notify_on == ("error",) and "notify_on" not in worker._steps[1].kwargs
    copy = worker.configure(sleep_duration=1)
    assert type(copy) is DataJointWorker and copy.notifiers == (notifier,) and copy._sleep_duration == 1
    assert copy.processes == worker.processes
    with pytest.raises(ValueError, match=r"notifiers\[0\] \(object\) has no callable notify method"):
        DataJointWorker("w", name, notifiers=[object()])


def test_tables_need_a_worker_first():
    with pytest.raises(Exception, match="make one first"):
        ErrorLog.log_exception({"k": 1}, print, ValueError("x"))
