"""Seconds from a worker's first cycle's start to its first job, on `keys` new keys (bench/fleet_scale.py).

argv: keys, ``all`` (the whole first refresh written before the first job: djsupervisor before issue 15's
change) or ``batch`` (the default now: `steps.REFRESH_FIRST_ROWS` rows, then the first call's jobs, then the
rest). The worker takes one job (``max_calls=1``). Prints "seconds-to-first-job seconds-of-the-cycle".
"""

from __future__ import annotations

import sys
import time

import bench_pipeline as b

from djsupervisor import DataJointWorker
from djsupervisor.worker import steps

keys, mode = int(sys.argv[1]), sys.argv[2]
if mode == "all":
    steps.REFRESH_FIRST_ROWS = None
for start in range(0, keys, 20_000):
    b.lab.Source.insert([dict(source_id=i, value=float(i)) for i in range(start, min(keys, start + 20_000))])
worker = DataJointWorker("first", f"{b.PREFIX}_workers", sleep_duration=0)
worker(b.lab.Square, max_calls=1)
_ = worker.schema.tables  # declared before the clock starts, as a running worker's are
first: list[float] = []
worker.add_listener(lambda event: first.append(time.perf_counter()) if event.kind == "job_start" else None)
began = time.perf_counter()
summary = worker.run_once()
ended = time.perf_counter()
assert summary.jobs_done == 1 and len(b.lab.Square.jobs) + 1 == keys, (summary, len(b.lab.Square.jobs))
print(f"{first[0] - began:.3f} {ended - began:.3f}")
