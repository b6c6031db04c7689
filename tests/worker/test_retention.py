"""Retention: back-dated rows older than `log_retention_days` are pruned in bounded batches under a lock that
one pruner holds at a time, and idle cycles fold into one WorkerLog row per idle stretch."""

from __future__ import annotations

import datetime
import os
import platform
import time

import datajoint as dj
import pytest
from pipelines.lab import declare

from djsupervisor import DataJointWorker
from djsupervisor.worker import retention
from djsupervisor.worker.cycle_log import STRETCH_SECONDS, CycleLog
from djsupervisor.worker.events import CycleSummary, ProcessCounts
from djsupervisor.worker.schema import WorkerSchema

pytestmark = pytest.mark.timeout(180)

DAY = datetime.timedelta(days=1)


def identity(pid: int = 4242, host: str = "node-a") -> dict:
    return dict(worker_name="lab", host=host, pid=pid, process_start=datetime.datetime(2026, 1, 1, 12, 0, 0))


def log_at(schema: WorkerSchema, when: datetime.datetime) -> None:
    """A WorkerLog row of a busy cycle that started at `when`, written as the loop writes it."""
    schema.log_cycle(identity(), busy_summary(when.timestamp()), {"lab.step": 0.1})


def error_at(schema: WorkerSchema, when: datetime.datetime) -> None:
    """An ErrorLog row of a job that failed at `when`."""
    schema.log_error(
        identity(), kind="job", process="lab.step", key=None, message="ValueError: old", stack=None, when=when
    )


def registered_row(pid: int, heartbeat: datetime.datetime, state: str, host: str = "node-a") -> dict:
    return dict(
        identity(pid, host),
        settings={},
        connection_id=0,
        state=state,
        last_heartbeat=heartbeat,
        heartbeat_window=16.0,
    )


def seed(schema: WorkerSchema, now: datetime.datetime) -> None:
    """7 WorkerLog, 5 ErrorLog, 4 RegisteredWorker and 3 JobAttempt rows older than 30 days; 3, 2, 2 and 1
    younger ones."""
    tables = schema.tables
    for when in [now - 40 * DAY - i * DAY for i in range(7)] + [now - 29 * DAY, now - DAY, now]:
        log_at(schema, when)
    for when in [now - 31 * DAY - i * DAY for i in range(5)] + [now - 20 * DAY, now]:
        error_at(schema, when)
    old = [(1, "stopped"), (2, "exited"), (3, "running"), (4, "sleeping")]  # the last two: overdue for weeks
    tables["RegisteredWorker"].insert([registered_row(pid, now - 35 * DAY, state) for pid, state in old])
    tables["RegisteredWorker"].insert([registered_row(5, now - 2 * DAY, "exited"), registered_row(6, now, "running")])
    tables["JobAttempt"].insert(
        [
            dict(table_name="`lab`.`__step`", key_hash=f"{i:032x}", job_key={"id": i}, attempts=1, incident="h:1")
            | dict(kind="died", reason="its process was gone", last_time=when)
            for i, when in enumerate([now - 31 * DAY, now - 45 * DAY, now - 60 * DAY, now - DAY])
        ]
    )


def test_only_rows_older_than_the_retention_go_in_batches(db):
    schema = WorkerSchema(db.schema_name("workers"), db.connection)
    now = retention.server_now(db.connection)
    seed(schema, now)
    tables = schema.tables
    names = {name: tables[name].full_table_name for name in ("WorkerLog", "ErrorLog", "RegisteredWorker", "JobAttempt")}

    first = retention.prune(schema, 30, batch_size=2, max_batches=2)  # a pass stops after max_batches
    assert not first.skipped
    assert first.batches == {
        names["WorkerLog"]: [2, 2],
        names["ErrorLog"]: [2, 2],
        names["RegisteredWorker"]: [2, 2],
        names["JobAttempt"]: [2, 1],
    }

    second = retention.prune(schema, 30, batch_size=2, max_batches=2)
    assert second.batches == {
        names["WorkerLog"]: [2, 1],
        names["ErrorLog"]: [1],
        names["RegisteredWorker"]: [0],
        names["JobAttempt"]: [0],
    }
    assert retention.prune(schema, 30, batch_size=2).total == 0

    assert len(tables["WorkerLog"]()) == 3 and len(tables["ErrorLog"]()) == 2
    assert sorted(tables["RegisteredWorker"]().to_arrays("pid")) == [5, 6]
    assert len(tables["JobAttempt"]()) == 1
    cutoff = now - 30 * DAY
    assert min(tables["WorkerLog"]().to_arrays("log_time")) > cutoff
    assert min(tables["ErrorLog"]().to_arrays("error_time")) > cutoff


def other_connection(db) -> dj.Connection:
    """A second session on the same server (another pruner, as from another host)."""
    settings = db.settings
    return dj.Connection(
        settings["host"], settings["user"], settings["password"], settings["port"], False, backend=db.backend
    )


def test_the_lock_makes_a_second_concurrent_pruner_skip(db):
    schema = WorkerSchema(db.schema_name("workers"), db.connection)
    seed(schema, retention.server_now(db.connection))
    other = other_connection(db)
    try:
        name = retention.lock_name(schema.schema_name)
        assert retention.try_lock(other, name)  # the other pruner is in its pass
        result = retention.prune(schema, 30)
        assert result.skipped and result.total == 0
        assert len(schema.tables["WorkerLog"]()) == 10 and len(schema.tables["ErrorLog"]()) == 7
        retention.release_lock(other, name)
        result = retention.prune(schema, 30)
        assert not result.skipped and result.total == 7 + 5 + 4 + 3
        count = f"SELECT COUNT(*) FROM {schema.tables['WorkerLog'].full_table_name}"
        assert other.query(count).fetchone()[0] == 3  # committed batch by batch: other sessions see it at once
        assert retention.try_lock(other, name)  # the pass gave the lock back
        retention.release_lock(other, name)
    finally:
        other.close()


def test_a_lock_name_fits_mysql_for_the_longest_schema_name():
    long_name = "s" * 64
    assert len(retention.lock_name(long_name)) <= 64
    assert retention.lock_name(long_name) != retention.lock_name("s" * 63)
    assert retention.lock_name("lab_workers") == "djsupervisor.prune.lab_workers"


def idle_summary(cycle: int, started: float, *, done: int = 0) -> CycleSummary:
    """Cycle `cycle` of a one-callable worker, started at `started` (epoch seconds): idle unless `done`."""
    summary = CycleSummary(cycle=cycle, started=started)
    summary.processes["lab.step"] = ProcessCounts("callable", done=done)
    return summary


def busy_summary(started: float) -> CycleSummary:
    return idle_summary(1, started, done=1)


def test_a_week_of_one_second_idle_cycles_writes_a_few_hundred_rows(db):
    schema = WorkerSchema(db.schema_name("workers"), db.connection)
    log = CycleLog(lambda: schema)
    me = identity(os.getpid())
    week = 7 * 24 * 3600
    start = time.time() - week - 3600  # back-dated: the cycles' own start times are the clock
    busy = {3 * 24 * 3600 + 1800}  # one cycle mid-week does work and closes the stretch it falls in, half-way
    for second in range(week):
        log.log(me, idle_summary(second + 1, start + second, done=int(second in busy)), {"lab.step": 0.001})
    log.close()
    rows = schema.tables["WorkerLog"]().to_dicts(order_by="cycle")
    assert len(rows) <= 7 * 24 + 2  # 168 hourly stretches, the busy cycle and the stretch it cut short
    assert sum(r["idle_cycles"] for r in rows) == week - 1  # every idle cycle is counted, none twice
    assert [r["cycle"] for r in rows if r["idle_cycles"] == 0] == [3 * 24 * 3600 + 1800 + 1]
    stretches = [r for r in rows if r["idle_cycles"]]
    assert max(r["idle_cycles"] for r in stretches) == STRETCH_SECONDS
    assert all(r["last_time"] - r["log_time"] < datetime.timedelta(seconds=STRETCH_SECONDS) for r in stretches)
    last_cycle = datetime.datetime.fromtimestamp(start + week - 1)
    assert abs(stretches[-1]["last_time"] - last_cycle) < datetime.timedelta(seconds=1)  # written at close()


def test_the_loop_folds_idle_cycles_and_a_hand_run_worker_prunes_its_schema(db):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed([1, 2])
    worker = DataJointWorker("folder", db.schema_name("workers"), sleep_duration=0, max_idled_cycle=40)
    worker(pipe.Square)
    tables = worker.schema.tables
    now = retention.server_now(db.connection)
    error_at(worker.schema, now - 31 * DAY)
    error_at(worker.schema, now - DAY)
    tables["RegisteredWorker"].insert1(registered_row(7, now - 40 * DAY, "exited", host=platform.node()))
    worker.run()

    rows = tables["WorkerLog"]().to_dicts(order_by="cycle")
    assert [(r["cycle"], r["jobs_done"], r["idle_cycles"]) for r in rows] == [(1, 2, 0), (2, 0, 41)]
    assert len(tables["ErrorLog"]()) == 1  # the old error went after the first cycle
    assert [r["pid"] for r in tables["RegisteredWorker"]().to_dicts()] == [os.getpid()]


OLD_WORKER_LOG = """
log_id          : char(32)
---
worker_name     : varchar(64)
host            : varchar(255)
pid             : int32
cycle           : int32
process         : varchar(255)
log_time        : datetime(3)
jobs_done       : int32
jobs_failed     : int32
duration        : float64
recovered=0     : int32
cleared=0       : int32
"""


def test_a_worker_log_of_0_1_0_still_gets_one_row_per_cycle(db):
    name = db.schema_name("workers")
    old = dj.Schema(name, connection=db.connection)
    old(type("WorkerLog", (dj.Manual,), {"definition": OLD_WORKER_LOG}))  # as djsupervisor 0.1.0 declared it
    schema = WorkerSchema(name, db.connection)
    log = CycleLog(lambda: schema)
    start = time.time()
    for second in range(3):
        log.log(identity(os.getpid()), idle_summary(second + 1, start + second), {"lab.step": 0.0})
    log.close()
    assert sorted(schema.tables["WorkerLog"]().to_arrays("cycle")) == [1, 2, 3]
