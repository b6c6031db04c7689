"""The lab-style module `pipelines.lab_worker` run as labs run it: by its own parse_args runner in a process
of its own, and unchanged under ``djsupervisor start`` (its workers named as module attributes); watched from
the database, on both backends."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import datajoint as dj
import pytest
from helpers import wait_until, write_config
from pipelines.lab import declare

from djsupervisor.dj_worker import parse_args

pytestmark = pytest.mark.timeout(150)


def worker_table(db, name: str) -> dj.FreeTable:
    return dj.FreeTable(db.connection, f"{db.schema_name('workerlog')}.{name}")


def test_parse_args_reads_upstreams_command_line():
    args = parse_args(["standard_worker", "-d", "3600", "-s", "30", "-vv"])
    assert (args.worker_name, args.duration, args.sleep, args.loglevel) == ("standard_worker", 3600, 30, logging.DEBUG)
    args = parse_args(["spike_sorting_worker", "--verbose"])
    assert (args.duration, args.sleep, args.loglevel) == (None, None, logging.INFO)
    with pytest.raises(SystemExit):
        parse_args(["standard_worker", "-d", "soon"])


def test_the_modules_own_runner_runs_a_worker_for_its_duration(db, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed([1, 2, 3])
    pipe.seed([-4])  # the callable logs it through the module-level ErrorLog
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.lab_worker", "standard_worker", "-d", "3", "-s", "1", "-v"],
        env=db.env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    elapsed = time.monotonic() - began
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(pipe.Square()) == 4
    cycles = worker_table(db, "worker_log") & "worker_name='standard_worker'"
    assert max(r["cycle"] for r in cycles.to_dicts()) >= 2  # -s 1 within -d 3: several cycles, then it ended
    assert elapsed < 60
    errors = (worker_table(db, "error_log") & "kind='exception'").to_dicts()
    assert errors and {e["process"] for e in errors} == {"__main__.auto_check_sources"}
    assert {e["worker_name"] for e in errors} == {"standard_worker"}
    registered = (worker_table(db, "registered_worker") & "worker_name='standard_worker'").to_dicts()
    assert [r["state"] for r in registered] == ["stopped"]


CONFIG = """
    [supervisor]
    name = "labworkers"
    graceful_timeout = 20

    [[worker]]
    name = "standard"
    target = "pipelines.lab_worker:standard_worker"
    sleep_duration = 1

    [[worker]]
    name = "cube"
    target = "pipelines.lab_worker:cube_worker"
    sleep_duration = 1
"""


@pytest.mark.process
def test_the_same_module_runs_under_djsupervisor_start(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed([1, 2, 3, -5])
    sup = supervise(["-c", str(write_config(tmp_path / "labworkers.toml", CONFIG))])
    sup.wait_children({"standard": 1, "cube": 1})
    # Cube's make() cannot spell a negative id: that job fails, and stays an error
    wait_until(lambda: len(pipe.Square()) == 4 and len(pipe.Cube()) == 3, 60, message="both workers' jobs")
    errors = worker_table(db, "error_log") & "kind='exception'"
    wait_until(lambda: len(errors) >= 1, 30, message="the callable's logged exception")
    assert {e["worker_name"] for e in errors.to_dicts()} == {"standard_worker"}
    assert {e["process"] for e in errors.to_dicts()} == {"pipelines.lab_worker.auto_check_sources"}
    registered = worker_table(db, "registered_worker").to_dicts()
    assert {(r["worker_name"], r["supervisor"]) for r in registered} == {
        ("standard_worker", "labworkers"),
        ("cube_worker", "labworkers"),
    }
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(30) == 0
