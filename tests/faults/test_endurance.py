"""Endurance faults: a job that ignores a graceful stop, and the parent's memory over many restarts."""

from __future__ import annotations

import signal
import time

import psutil
import pytest
from helpers import wait_until, write_config
from pipelines.lab import declare

from djsupervisor.serve.control import send_request

pytestmark = pytest.mark.process


@pytest.mark.timeout(120)
def test_hung_job_is_killed_after_graceful_timeout_and_goes_back_to_pending(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed([1], hang=1)
    config = write_config(
        tmp_path / "lab.toml",
        """
        [supervisor]
        name = "lab"
        graceful_timeout = 2
        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
    """,
    )
    sup = supervise(["-c", str(config)])
    sup.wait_children({"standard": 1})
    wait_until(lambda: pipe.Square.jobs.progress()["reserved"] == 1, 60, message="the hanging job in flight")
    began = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(30) == 0
    took = time.monotonic() - began
    assert 2 <= took < 15, took  # waited graceful_timeout for the job, then killed it
    progress = pipe.Square.jobs.progress()
    assert progress["pending"] == 1 and progress["reserved"] == 0 and progress["error"] == 0, progress


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["mysql"], indirect=True)  # the parent does no database work
def test_parent_memory_stays_flat_over_many_restarts(db, supervise, tmp_path):
    socket_path = tmp_path / "churn.sock"
    config = write_config(
        tmp_path / "churn.toml",
        f"""
        [supervisor]
        name = "churn"
        control_socket = "{socket_path}"
        sample_interval = 0.5
        [[worker]]
        name = "churn"
        target = "pipelines.workers:churn"
        replicas = 4
    """,
    )
    sup = supervise(["-c", str(config)])
    parent = psutil.Process(sup.pid)

    def restarts() -> int:
        try:
            return sum(w["restarts"] for w in send_request(str(socket_path), {"cmd": "status"})["slots"])
        except Exception:
            return 0

    wait_until(lambda: restarts() >= 100, 120, interval=0.5, message="100 restarts")
    baseline = parent.memory_info().rss
    target = 800
    wait_until(lambda: restarts() >= target, 240, interval=0.5, message=f"{target} restarts")
    grown = (parent.memory_info().rss - baseline) / 2**20
    assert grown < 4, f"parent RSS grew {grown:.1f} MiB over {target - 100} restarts"
    assert "FATAL" not in str(send_request(str(socket_path), {"cmd": "status"}))
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(60) == 0
    print(f"parent RSS grew {grown:.2f} MiB over {target - 100} restarts")
