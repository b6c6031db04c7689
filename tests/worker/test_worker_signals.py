"""SIGTERM to a process running DataJointWorker.run(): the job in flight lands, nothing is marked error."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from helpers import TESTS
from jobtools import wait_until
from pipelines.lab import declare

pytestmark = pytest.mark.timeout(90)

SCRIPT = TESTS / "scripts" / "sigterm_worker.py"


def start_worker_script(db) -> subprocess.Popen:
    """The hand-run worker script (a DataJointWorker's `run()` in its own process), its output piped."""
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), db.prefix],
        env=db.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigterm_lands_the_job_in_flight_and_exits_cleanly(db):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed(range(1, 7), delay=1.5)
    process = start_worker_script(db)
    try:
        wait_until(lambda: pipe.Square.jobs.progress()["reserved"] == 1, 30, message="a job in flight")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "worker returned" in output
    progress = pipe.Square.jobs.progress()
    assert progress["error"] == 0 and progress["reserved"] == 0, progress
    assert len(pipe.Square()) >= 1  # the job in flight landed
    assert len(pipe.Square()) + progress["pending"] == 6  # and no other job was started


def test_sigterm_while_sleeping_ends_the_sleep(db):
    pipe = declare(db.schema_name("pipe"))
    process = start_worker_script(db)
    try:
        wait_until(lambda: "sleeping" in registered_states(db), 30, message="the worker to sleep")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)  # sleep_duration is 60 s
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert registered_states(db) == ["stopped"]
    assert len(pipe.Square()) == 0


def registered_states(db) -> list[str]:
    connection = db.connection
    q = connection.adapter.quote_identifier
    try:
        rows = connection.query(
            f"SELECT {q('state')} FROM {q(db.schema_name('workers'))}.{q('registered_worker')}"
        ).fetchall()
    except Exception:
        return []
    return [r[0] for r in rows]
