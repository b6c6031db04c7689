"""One of many processes that start working the same fresh pipeline at the same instant.

argv: test prefix, wall-clock start time (epoch seconds), worker index. Prints the cycle summary as JSON.
The pipeline's job tables do not exist yet: every process declares them on first use, at once.
`db.env` puts tests/ on PYTHONPATH, for `pipelines`.
"""

import json
import sys
import time

import datajoint as dj
from pipelines.lab import declare

from djsupervisor import DataJointWorker

prefix, start_at, index = sys.argv[1], float(sys.argv[2]), sys.argv[3]
dj.conn()
pipe = declare(f"{prefix}_pipe", job_tables=False)
worker = DataJointWorker(f"w{index}", f"{prefix}_workers", sleep_duration=0, db_prefix=prefix)
worker(pipe.Square)
worker(pipe.Cube)
time.sleep(max(0.0, start_at - time.time()))
summary = worker.run_once()
print(json.dumps(summary.as_dict()))
