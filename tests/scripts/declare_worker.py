"""One of many processes declaring the same worker schema at the same instant and writing to it.

argv: worker schema name, wall-clock start time (epoch seconds). Prints the cycle summary as JSON.
"""

import json
import sys
import time

import datajoint as dj

from djsupervisor import DataJointWorker

schema_name, start_at = sys.argv[1], float(sys.argv[2])
dj.conn()
worker = DataJointWorker(f"w{sys.argv[3]}", schema_name, sleep_duration=0, db_prefix=schema_name)
worker(lambda: 1)
time.sleep(max(0.0, start_at - time.time()))
summary = worker.run_once()
print(json.dumps(summary.as_dict()))
