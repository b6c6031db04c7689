"""The worker schema: what RegisteredWorker, WorkerLog and ErrorLog hold, and concurrent declaration."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import pytest
from helpers import TESTS
from pipelines.lab import declare

from djsupervisor import DataJointWorker

pytestmark = pytest.mark.timeout(120)


def test_tables_record_registration_cycles_and_errors(db):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed([1, 2])
    pipe.seed([3], fail="bad source 3")
    worker = DataJointWorker(
        "recorder",
        db.schema_name("workers"),
        sleep_duration=0,
        max_idled_cycle=1,
        db_prefix=db.prefix,
        autoclear_error_patterns=["%nothing%"],
    )
    worker(pipe.Square)
    worker(pipe.Cube)
    worker.run()
    tables = worker.schema.tables

    (registered,) = tables["RegisteredWorker"]().to_dicts()
    assert registered["worker_name"] == "recorder"
    assert registered["host"] == platform.node() and registered["pid"] == os.getpid()
    assert registered["state"] == "stopped"
    assert registered["cycles"] == 3 and registered["jobs_done"] == 4 and registered["jobs_failed"] == 1
    assert registered["connection_id"] == db.connection.connection_id
    assert registered["settings"]["autoclear_error_patterns"] == ["%nothing%"]
    assert [p["name"] for p in registered["settings"]["processes"]] == worker.processes
    assert registered["process_start"] <= registered["last_heartbeat"]

    logs = tables["WorkerLog"]().to_dicts(order_by="cycle, process")
    assert len(logs) == 4  # the busy cycle 1, then the idle stretch of cycles 2-3 (one row per process each)
    assert [(r["cycle"], r["idle_cycles"]) for r in logs] == [(1, 0), (1, 0), (2, 2), (2, 2)]
    assert all(r["last_time"] > r["log_time"] for r in logs if r["idle_cycles"])  # written at the stop
    first = {r["process"]: r for r in logs if r["cycle"] == 1}
    assert first[pipe.Square().full_table_name]["jobs_done"] == 2
    assert first[pipe.Square().full_table_name]["jobs_failed"] == 1
    assert first[pipe.Cube().full_table_name]["jobs_done"] == 2
    assert all(r["duration"] >= 0 and r["worker_name"] == "recorder" for r in logs)

    (error,) = tables["ErrorLog"]().to_dicts()
    assert error["kind"] == "job" and error["key"] == {"source_id": 3}
    assert error["process"] == pipe.Square().full_table_name
    assert error["error_message"] == "ValueError: bad source 3" and "make" in error["error_stack"]


def test_many_processes_declare_and_write_at_once(db):
    schema_name = db.schema_name("workers")
    start_at = time.time() + 4
    script = TESTS / "scripts" / "declare_worker.py"
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), schema_name, str(start_at), str(i)],
            env=db.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    outputs = [p.communicate(timeout=90) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["jobs_done"] == 1
        assert "WARNING" not in err, err  # no bookkeeping step failed
    worker = DataJointWorker("reader", schema_name)
    assert len(worker.schema.tables["RegisteredWorker"]()) == 6
    assert len(worker.schema.tables["WorkerLog"]()) == 6


def test_many_workers_declare_job_tables_and_share_the_work(db):
    pipe = declare(db.schema_name("pipe"), job_tables=False)  # the workers race to declare them
    pipe.seed(range(1, 31))
    start_at = time.time() + 4
    script = TESTS / "scripts" / "populate_worker.py"
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), db.prefix, str(start_at), str(i)],
            env=db.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(5)
    ]
    outputs = [p.communicate(timeout=90) for p in processes]
    done = 0
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["jobs_failed"] == 0, err
        done += summary["jobs_done"]
    assert done == 60  # 30 Square + 30 Cube, each computed exactly once across the five workers
    assert len(pipe.Square()) == 30 and len(pipe.Cube()) == 30
