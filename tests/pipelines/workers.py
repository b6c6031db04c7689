"""Every worker the supervisor tests start, all on the one test pipeline (`pipelines.lab`).

A supervisor imports its targets, so this module reads the test's schema prefix from DJS_TEST_PREFIX
(`db.env` sets it for every subprocess) and declares the pipeline in ``<prefix>_pipe`` at import; what
each job does is in the Source rows the test inserted, not here.

standard: populates Square; other: populates Cube; crasher: dies in its first cycle, every time;
chain: Square then Cube (fault tests); pooled: Square with populate(processes=2), then Cube;
churn: ends after one short cycle, so its supervisor restarts it over and over.
"""

from __future__ import annotations

import os

import datajoint as dj

from djsupervisor import DataJointWorker

from .lab import declare

PREFIX = os.environ["DJS_TEST_PREFIX"]
WORKER_SCHEMA = f"{PREFIX}_workers"
dj.config["safemode"] = False

lab = declare(f"{PREFIX}_pipe")

standard = DataJointWorker("standard", WORKER_SCHEMA, sleep_duration=1, db_prefix=PREFIX)
standard(lab.Square)

other = DataJointWorker("other", WORKER_SCHEMA, sleep_duration=1, db_prefix=PREFIX)
other(lab.Cube)


def crash() -> None:
    """Die at once, like a worker whose code cannot get going."""
    os._exit(3)


crasher = DataJointWorker("crasher", WORKER_SCHEMA, sleep_duration=1, db_prefix=PREFIX)
crasher(crash)

chain = DataJointWorker("chain", WORKER_SCHEMA, sleep_duration=0.5, db_prefix=PREFIX)
chain(lab.Square)
chain(lab.Cube)

pooled = DataJointWorker("pooled", WORKER_SCHEMA, sleep_duration=0.5, db_prefix=PREFIX)
pooled(lab.Square, processes=2)
pooled(lab.Cube)

churn = DataJointWorker("churn", WORKER_SCHEMA, run_duration=0.001, sleep_duration=0, db_prefix=PREFIX)
churn(lambda: 0)
