"""Pipeline used by bench/run.py: Source (manual) -> Work (computed).

Configured by environment variables, read at import (each benchmark run gets its own prefix):
DJS_BENCH_PREFIX (schema prefix), DJS_BENCH_MS (milliseconds each make() sleeps),
DJS_BENCH_SLEEP (worker sleep_duration, seconds), DJS_BENCH_MAX_SLEEP (max_sleep_duration, optional).
Work rows record the pid that computed them and when make() started and finished (time.time()),
so the benchmark reads throughput, restart and stop latencies from the database.
`worker` is the djsupervisor target; `python bench/bench_pipeline.py` is the plain baseline loop.
"""

from __future__ import annotations

import os
import signal
import time

import datajoint as dj

from djsupervisor import DataJointWorker

PREFIX = os.environ.get("DJS_BENCH_PREFIX", "djsbench_default")
MS = float(os.environ.get("DJS_BENCH_MS", "5"))
SLEEP = float(os.environ.get("DJS_BENCH_SLEEP", "0.1"))
MAX_SLEEP = os.environ.get("DJS_BENCH_MAX_SLEEP")

schema = dj.Schema(f"{PREFIX}_pipe")


@schema
class Source(dj.Manual):
    definition = """
    source_id : int32
    """


@schema
class Work(dj.Computed):
    definition = """
    -> Source
    ---
    pid : int32
    started : float64
    finished : float64
    """

    def make(self, key):
        started = time.time()
        if MS:
            time.sleep(MS / 1000)
        self.insert1(dict(key, pid=os.getpid(), started=started, finished=time.time()))


_kwargs = dict(db_prefix=[PREFIX], sleep_duration=SLEEP)
if MAX_SLEEP:
    _kwargs["max_sleep_duration"] = float(MAX_SLEEP)
worker = DataJointWorker("bench", f"{PREFIX}_workers", **_kwargs)
worker(Work)

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


def plain_loop() -> None:
    """The baseline: what labs run under tmux or supervisord, a populate loop with a sleep when idle."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    table = Work()
    while not stopping:
        result = table.populate(reserve_jobs=True, suppress_errors=True)
        if not result.get("success_count") and not stopping:
            time.sleep(SLEEP)


if __name__ == "__main__":
    plain_loop()
