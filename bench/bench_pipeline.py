"""The benchmarks' pipeline and worker: the test pipeline (tests/pipelines/lab.py), worked by one DataJointWorker.

The benchmarks use the tests' pipeline rather than one of their own, so that what is measured is what is
tested; tests/ goes on sys.path here (bench/ is not a package, and the pipeline's home is the test suite).
Configured by environment variables, read at import (each benchmark run gets its own prefix):
DJS_BENCH_PREFIX (schema prefix), DJS_BENCH_MS (milliseconds each make() sleeps: the `delay` that `seed`
writes into the Source rows), DJS_BENCH_SLEEP (worker sleep_duration, seconds), DJS_BENCH_MAX_SLEEP
(max_sleep_duration, optional). Square rows record the pid that computed them and when make() started and
finished (time.time()), so the benchmark reads throughput, restart and stop latencies from the database.
`worker` is the djsupervisor target; `python bench/bench_pipeline.py` is the plain baseline loop.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pipelines.lab import declare

from djsupervisor import DataJointWorker

PREFIX = os.environ.get("DJS_BENCH_PREFIX", "djsbench_default")
MS = float(os.environ.get("DJS_BENCH_MS", "5"))
SLEEP = float(os.environ.get("DJS_BENCH_SLEEP", "0.1"))
MAX_SLEEP = os.environ.get("DJS_BENCH_MAX_SLEEP")
REFRESH_INTERVAL = os.environ.get("DJS_BENCH_REFRESH_INTERVAL")  # the worker's refresh_interval (unset: default)

lab = declare(f"{PREFIX}_pipe")  # with the job tables: plain loops racing to declare them on PostgreSQL can fail


def seed(n: int) -> None:
    """Source rows 0..n-1 whose make()s sleep DJS_BENCH_MS milliseconds."""
    lab.seed(range(n), delay=MS / 1000)


_kwargs = dict(db_prefix=[PREFIX], sleep_duration=SLEEP)
if MAX_SLEEP:
    _kwargs["max_sleep_duration"] = float(MAX_SLEEP)
if REFRESH_INTERVAL:
    _kwargs["refresh_interval"] = float(REFRESH_INTERVAL)
worker = DataJointWorker("bench", f"{PREFIX}_workers", **_kwargs)
worker(lab.Square)

COUNT_DIR = os.environ.get("DJS_BENCH_COUNT_DIR")
if COUNT_DIR:  # idle load: every statement this process sends, logged as "time count" at each sleep
    _sent = [0]
    _connection = worker.connection
    _query = _connection.query

    def _counted(*args, **kwargs):
        _sent[0] += 1
        return _query(*args, **kwargs)

    def _log_count(event) -> None:
        if event.kind == "sleep":
            with open(os.path.join(COUNT_DIR, str(os.getpid())), "a") as file:
                file.write(f"{time.time()} {_sent[0]}\n")

    _connection.query = _counted
    worker.add_listener(_log_count)


REFRESH_DIR = os.environ.get("DJS_BENCH_REFRESH_DIR")
if REFRESH_DIR:  # refresh cost (bench/fleet_scale.py): every job-queue refresh, logged as "time seconds"
    from datajoint.jobs import Job

    _refresh = Job.refresh

    def _timed_refresh(self, *args, **kwargs):
        began = time.perf_counter()
        try:
            return _refresh(self, *args, **kwargs)
        finally:
            with open(os.path.join(REFRESH_DIR, str(os.getpid())), "a") as file:
                file.write(f"{time.time()} {time.perf_counter() - began}\n")

    Job.refresh = _timed_refresh

LOST_DIR = os.environ.get("DJS_BENCH_LOST_DIR")


def count_lost(table) -> None:
    """Plain loops' lost reservations (bench/fleet_scale.py): `table.jobs.reserve` counted, and "done lost"
    written to LOST_DIR/pid at most every half second (the loop is killed, not stopped)."""
    jobs, counts, written = table.jobs, [0, 0], [0.0]
    reserve = jobs.reserve

    def counted(key):
        ok = reserve(key)
        counts[not ok] += 1
        if time.monotonic() - written[0] > 0.5:
            written[0] = time.monotonic()
            path = os.path.join(LOST_DIR, str(os.getpid()))
            with open(path + ".new", "w") as file:
                file.write(f"{counts[0]} {counts[1]}\n")
            os.replace(path + ".new", path)  # whole: the loop may be killed mid-write
        return ok

    jobs.reserve = counted


def plain_loop() -> None:
    """The baseline: what labs run under tmux or supervisord, a populate loop with a sleep when idle."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    table = lab.Square()
    if LOST_DIR:
        count_lost(table)
    while not stopping:
        result = table.populate(reserve_jobs=True, suppress_errors=True)
        if not result.get("success_count") and not stopping:
            time.sleep(SLEEP)


if __name__ == "__main__":
    plain_loop()
