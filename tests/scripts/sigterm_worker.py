"""A worker process for the SIGTERM test: populates Square slowly until told to stop.

argv: schema prefix, per-job delay in seconds. DJ_* variables reach the server.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datajoint as dj
from pipeline import make_pipeline

from djsupervisor import DataJointWorker

prefix, delay = sys.argv[1], float(sys.argv[2])
dj.config["safemode"] = False
pipe = make_pipeline(f"{prefix}_pipe")
pipe.Square.delay = delay
worker = DataJointWorker("sigterm", f"{prefix}_workers", sleep_duration=60, db_prefix=prefix)
worker(pipe.Square)
worker.run()
print("worker returned", flush=True)
