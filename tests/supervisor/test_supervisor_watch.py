"""What the supervisor watches: memory, job time, silence, children that cannot get going, max_jobs."""

from __future__ import annotations

import signal

import pytest
from helpers import process_gone, wait_until, write_config
from pipelines.lab import declare

pytestmark = [pytest.mark.process, pytest.mark.timeout(150)]


def config(tmp_path, supervisor: str = "", standard: str = "", extra: str = ""):
    return write_config(
        tmp_path / "lab.toml",
        f"""
[supervisor]
name = "lab"
graceful_timeout = 20
sample_interval = 0.5
{supervisor}

[[worker]]
name = "standard"
target = "pipelines.supervised:standard"
{standard}
{extra}
""",
    )


def job_rows(pipe) -> dict[int, dict]:
    return {row["source_id"]: row for row in pipe.Square.jobs.to_dicts()}


def test_leaking_make_is_recycled_at_the_memory_limit(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed(range(1, 7), leak_mb=80, delay=0.5)  # a child starts near 90 MB
    sup = supervise(["-c", str(config(tmp_path, standard="max_memory_mb = 200"))])
    first = sup.wait_children({"standard": 1})["standard[0]"]

    wait_until(lambda: len(pipe.Square()) == 6, 90, message=f"all jobs done\n{sup.output[-2000:]}")
    assert process_gone(first)
    pids = {row["worker_pid"] for row in pipe.Square.to_dicts()}
    assert len(pids) >= 2, pids  # the work was shared by successive children
    progress = pipe.Square.jobs.progress()
    assert progress["error"] == 0 and progress["reserved"] == 0, progress  # recycled between jobs, not in one
    assert "max_memory_mb 200; recycling it after its job in flight" in sup.output


def test_hanging_make_hits_job_timeout(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed([1], hang=1)
    pipe.seed([2, 3])
    # max_attempts 1: the first timeout gives the job up (by default it is retried, see test_poison_jobs)
    sup = supervise(["-c", str(config(tmp_path, standard="job_timeout = 3\nsleep_duration = 0.5\nmax_attempts = 1"))])
    first = sup.wait_children({"standard": 1})["standard[0]"]
    wait_until(lambda: job_rows(pipe).get(1, {}).get("status") == "reserved", 30, message="the hanging job")

    wait_until(lambda: job_rows(pipe)[1]["status"] == "error", 30, message=f"a timeout error\n{sup.output[-2000:]}")
    assert job_rows(pipe)[1]["error_message"] == "gave up after 1 attempt: timed out once after 3 s"
    assert process_gone(first)
    wait_until(lambda: len(pipe.Square()) == 2, 30, message="the other jobs")
    assert sup.pids("standard")["standard[0]"] != first  # replaced, and working
    assert job_rows(pipe)[1]["status"] == "error"  # not picked up again


def test_silent_child_is_detected_and_replaced(db, supervise, tmp_path):
    declare(db.schema_name("pipe"))
    sup = supervise(["-c", str(config(tmp_path, supervisor="heartbeat_timeout = 3"))])
    first = sup.wait_children({"standard": 1})["standard[0]"]
    wait_until(lambda: "standard[0] is running" in sup.output, 30, message="a first cycle")

    import os

    os.kill(first, signal.SIGSTOP)
    new = wait_until(
        lambda: (p := sup.pids().get("standard[0]")) not in (None, first) and p,
        20,
        message=f"a replacement\n{sup.output[-2000:]}",
    )
    assert new != first and process_gone(first)
    assert "no report for" in sup.output


def test_always_crashing_child_goes_fatal_while_a_healthy_pool_works(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed(range(1, 4))
    crasher = '\n[[worker]]\nname = "crasher"\ntarget = "pipelines.supervised:crasher"\n'
    path = config(tmp_path, supervisor="fatal_after = 3\nbackoff_initial = 0.1", extra=crasher)
    sup = supervise(["-c", str(path)])
    wait_until(
        lambda: "crasher[0] exited" in sup.output and "FATAL" in sup.output,
        30,
        message=f"crasher FATAL\n{sup.output[-2000:]}",
    )
    assert sup.output.count("started crasher[0]") == 3
    assert "crasher[0]" not in sup.pids()
    wait_until(lambda: len(pipe.Square()) == 3, 30, message="the healthy pool's work")
    pipe.seed([4])  # and it keeps working
    wait_until(lambda: len(pipe.Square()) == 4, 30, message="more work")
    assert sup.output.count("started crasher[0]") == 3  # never restarted
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(30) == 0


def test_child_is_recycled_after_max_jobs(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed(range(1, 6))
    sup = supervise(["-c", str(config(tmp_path, standard="max_jobs = 2\nsleep_duration = 0.5"))])
    wait_until(lambda: len(pipe.Square()) == 5, 60, message=f"all jobs\n{sup.output[-2000:]}")
    by_pid: dict[int, int] = {}
    for row in pipe.Square.to_dicts():
        by_pid[row["worker_pid"]] = by_pid.get(row["worker_pid"], 0) + 1
    assert len(by_pid) == 3 and max(by_pid.values()) == 2, by_pid
    assert pipe.Square.jobs.progress()["error"] == 0
    assert "FATAL" not in sup.output
