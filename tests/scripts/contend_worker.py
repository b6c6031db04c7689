"""One of two processes that work the same queued table at the same instant; prints what it did as JSON.

argv: test prefix, wall-clock start time (epoch seconds), mode. ``worker``: a DataJointWorker's cycle, which
walks the pending keys in its own order (`djsupervisor.worker.pending_order`); ``plain``: DataJoint's own
``populate(reserve_jobs=True)``, which walks them in DataJoint's order. Both count the reservations the
database refused (another process had the job first): the worker in its cycle summary, the plain loop by
wrapping ``jobs.reserve``. Prints ``{"done": N, "lost": N}``.
"""

import json
import sys
import time

import datajoint as dj
from pipelines.lab import declare

from djsupervisor import DataJointWorker

prefix, start_at, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
dj.conn()
pipe = declare(f"{prefix}_pipe")
if mode == "worker":
    worker = DataJointWorker("contend", f"{prefix}_workers", sleep_duration=0, refresh_interval=60)
    worker(pipe.Square)
    _ = worker.schema.tables  # declared before the start, as a running worker would have it
    time.sleep(max(0.0, start_at - time.time()))
    summary = worker.run_once()
    counts = summary.processes[pipe.Square().full_table_name]
    print(json.dumps({"done": counts.done, "lost": counts.lost}))
else:
    table = pipe.Square()
    jobs = table.jobs
    reserve, lost = jobs.reserve, [0]

    def counted(key):
        ok = reserve(key)
        lost[0] += not ok
        return ok

    jobs.reserve = counted
    time.sleep(max(0.0, start_at - time.time()))
    result = table.populate(reserve_jobs=True, suppress_errors=True, refresh=False)
    print(json.dumps({"done": result["success_count"], "lost": lost[0]}))
