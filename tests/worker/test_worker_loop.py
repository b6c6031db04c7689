"""DataJointWorker's cycle loop, in process, on both backends."""

from __future__ import annotations

import threading
import time

import pytest
from pipelines.lab import declare

from djsupervisor import DataJointWorker

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def pipe(db):
    return declare(db.schema_name("pipe"))


def new_worker(db, **settings) -> DataJointWorker:
    settings.setdefault("sleep_duration", 0)
    return DataJointWorker("test", db.schema_name("workers"), db_prefix=[db.prefix], **settings)


def test_run_once_populates_in_registration_order_and_summarizes(db, pipe):
    pipe.seed(range(1, 7))
    calls = []
    worker = new_worker(db)
    worker(pipe.Square)
    worker(pipe.Cube)
    worker(lambda: calls.append(len(pipe.Cube())) or 0)
    summary = worker.run_once()
    assert summary.processes[pipe.Square().full_table_name].done == 6
    assert summary.processes[pipe.Cube().full_table_name].done == 6
    assert calls == [6]  # the callable ran after both tables
    assert summary.jobs_done == 12 and summary.jobs_failed == 0 and not summary.idle
    assert summary.duration > 0 and summary.cycle == 1
    assert worker.run_once().idle


def test_failing_make_and_callable_are_recorded_and_do_not_end_the_loop(db, pipe):
    pipe.seed([1, 3, 4])
    pipe.seed([2], fail="bad source 2")

    def broken():
        raise RuntimeError("callable exploded")

    worker = new_worker(db, max_idled_cycle=1)
    worker(pipe.Square)
    worker(broken)
    worker(pipe.Cube)
    summary = worker.run_once()
    assert summary.processes[pipe.Square().full_table_name].done == 3
    assert summary.processes[pipe.Square().full_table_name].failed == 1
    assert summary.processes[pipe.Cube().full_table_name].done == 3  # ran after the failing callable
    assert len(pipe.Square.jobs.errors) == 1
    errors = worker.schema.tables["ErrorLog"]().to_dicts(order_by="error_time")
    by_kind = {e["kind"]: e for e in errors}
    assert by_kind["job"]["key"] == {"source_id": 2}
    assert "ValueError: bad source 2" in by_kind["job"]["error_message"]
    assert "Traceback" in by_kind["job"]["error_stack"]
    assert by_kind["callable"]["error_message"] == "RuntimeError: callable exploded"
    assert "broken" in by_kind["callable"]["process"]
    assert (
        summary.processes[
            "test_worker_loop.test_failing_make_and_callable_are_recorded_and_do_not_end_the_loop.<locals>.broken"
        ].errors
        == 1
    )
    # a callable that raises does not make a cycle busy: the loop still ends by max_idled_cycle
    worker.run()
    assert worker.activity.state == "stopped"
    assert len(pipe.Cube()) == 3


def test_idle_definition_callables_report_work(db, pipe):
    results = iter([5, 0, -1, None, "yes", "", 0.5, False, True])
    worker = new_worker(db)
    worker(lambda: next(results))
    idle = [worker.run_once().idle for _ in range(9)]
    assert idle == [False, True, True, True, False, True, False, True, False]


def test_max_idled_cycle_counts_consecutive_idle_cycles(db, pipe):
    pipe.seed([1, 2])
    worker = new_worker(db, max_idled_cycle=2)
    worker(pipe.Square)
    worker.run()
    # cycle 1 works, cycles 2, 3, 4 are idle: stop after more than 2 consecutive idle cycles
    assert worker.cycles == 4
    assert len(pipe.Square()) == 2


def test_idle_count_resets_when_a_cycle_does_work(db, pipe):
    work = iter([0, 1, 0, 1, 0, 0, 0])
    worker = new_worker(db, max_idled_cycle=2)
    worker(lambda: next(work))
    worker.run()
    assert worker.cycles == 7


def test_run_duration_stops_after_the_cycle_in_progress(db, pipe):
    pipe.seed(range(1, 4), delay=0.4)
    worker = new_worker(db, run_duration=0.5, sleep_duration=0.05)
    worker(pipe.Square)
    began = time.monotonic()
    worker.run()
    # the first cycle (3 jobs x 0.4 s) outlasts run_duration, yet completes: all three jobs land
    assert worker.cycles == 1
    assert len(pipe.Square()) == 3
    assert time.monotonic() - began >= 1.2


def test_run_duration_ends_the_sleep_no_new_cycle_after_it(db, pipe):
    worker = new_worker(db, run_duration=0.6, sleep_duration=30)
    worker(lambda: 1)
    began = time.monotonic()
    worker.run()
    assert worker.cycles == 1
    assert time.monotonic() - began < 5


def test_adaptive_sleep_doubles_while_idle_and_resets_on_work(db, pipe):
    work = iter([0, 0, 0, 0, 1, 0, 0])
    worker = new_worker(db, sleep_duration=0.01, max_sleep_duration=0.04, max_idled_cycle=-1)
    sleeps = []
    worker.add_listener(lambda e: e.kind == "sleep" and sleeps.append(round(e.seconds, 3)))

    def step():
        value = next(work, None)
        if value is None:
            worker.stop("enough")
            return 0
        return value

    worker(step)
    worker.run()
    assert sleeps == [0.01, 0.02, 0.04, 0.04, 0.01, 0.01, 0.02]


def test_stop_between_jobs_lets_the_job_in_flight_land(db, pipe):
    pipe.seed([1, 2, 3, 4, 5])  # a worker takes them in its own order (pending_order): stop in the second
    worker = new_worker(db, sleep_duration=60)
    worker(pipe.Square)
    worker(pipe.Cube)
    started = []

    def stop_in_job_2(event):
        if event.kind == "job_start":
            started.append(event.key)
            if len(started) == 2:
                worker.stop("test")  # asked while the second job is in flight (reserved; its make() runs next)

    worker.add_listener(stop_in_job_2)
    events = []
    worker.add_listener(lambda e: events.append(e.kind))
    began = time.monotonic()
    worker.run()
    assert time.monotonic() - began < 30  # no sleep after the stop
    assert len(pipe.Square()) == 2 == len(started)  # the first job and the one in flight landed; no new job
    progress = pipe.Square.jobs.progress()
    assert progress["error"] == 0 and progress["reserved"] == 0 and progress["pending"] == 3
    assert len(pipe.Cube()) == 0  # later processes do not start either
    assert events[-2:] == ["cycle_end", "stopped"]  # the cycle was still logged
    assert len(worker.schema.tables["WorkerLog"]()) == 1


def test_stop_from_another_thread_wakes_the_sleep(db, pipe):
    worker = new_worker(db, sleep_duration=60)
    worker(lambda: 0)
    timer = threading.Timer(0.5, worker.stop)
    timer.start()
    began = time.monotonic()
    worker.run()
    assert time.monotonic() - began < 5
    assert worker.activity.state == "stopped"


def test_activity_reports_table_and_key_during_a_job(db, pipe):
    pipe.seed([1])
    worker = new_worker(db)
    worker(pipe.Square)
    seen = []
    worker.add_listener(lambda e: e.kind == "job_start" and seen.append(worker.activity))  # job 1 is in flight
    assert worker.activity.state == "idle"
    worker.run_once()
    assert seen[0].state == "populating"
    assert seen[0].table == pipe.Square().full_table_name
    assert seen[0].key == {"source_id": 1}
    assert worker.activity.state == "running"


def test_populate_kwargs_are_forwarded(db, pipe):
    pipe.seed(range(1, 7))
    worker = new_worker(db)
    worker(pipe.Square, restrictions="source_id > 2", max_calls=2)
    summary = worker.run_once()
    assert summary.jobs_done == 2
    assert {k["source_id"] for k in pipe.Square.keys()} <= {3, 4, 5, 6}


def test_a_cycle_starts_with_a_small_batch_and_refreshes_once(db, pipe, monkeypatch):
    from datajoint.jobs import Job

    from djsupervisor.worker import steps

    pipe.seed([1, 2, 3, 4, 6, 7, 8])
    pipe.seed([5], fail="bad source 5")
    monkeypatch.setattr(steps, "POPULATE_BATCH", 3)
    worker = new_worker(db)
    worker(pipe.Square)
    calls = {"populate": 0, "refresh": 0}
    for owner, name in ((worker._steps[0].table, "populate"), (Job, "refresh")):

        def counted(*args, _original=getattr(owner, name), _name=name, **kwargs):  # noqa: B008  (bound per loop turn)
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    summary = worker.run_once()
    assert (summary.jobs_done, summary.jobs_failed) == (7, 1)
    assert calls == {"populate": 3, "refresh": 1}  # 3 jobs, then the other 5, then a call that finds none


def test_configure_copies_processes_and_overrides_settings(db, pipe):
    worker = new_worker(db, sleep_duration=5)
    worker(pipe.Square)
    copy = worker.configure(sleep_duration=1, max_idled_cycle=3)
    assert copy.processes == worker.processes
    assert (copy.sleep_duration, copy.max_idled_cycle, worker.sleep_duration) == (1, 3, 5)
    with pytest.raises(TypeError, match="unknown worker setting 'sleep'"):
        worker.configure(sleep=3)
    with pytest.raises(ValueError, match="sleep_duration"):
        worker.configure(sleep_duration=-1)


def test_register_rejects_what_cannot_run(db, pipe):
    worker = new_worker(db)
    with pytest.raises(TypeError, match="cannot register"):
        worker(42)
