"""A worker process for the SIGTERM test: populates Square (as slowly as the Source rows say) until told to stop.

argv: schema prefix. DJ_* variables reach the server; `db.env` puts tests/ on PYTHONPATH for `pipelines`.
"""

import sys

import datajoint as dj
from pipelines.lab import declare

from djsupervisor import DataJointWorker

prefix = sys.argv[1]
dj.config["safemode"] = False
pipe = declare(f"{prefix}_pipe")
worker = DataJointWorker("sigterm", f"{prefix}_workers", sleep_duration=60, db_prefix=prefix)
worker(pipe.Square)
worker.run()
print("worker returned", flush=True)
