"""Worker definitions for process tests; the schema prefix comes from DJS_TEST_PREFIX.

standard: populates Square; other: populates Cube; crasher: dies in its first cycle, every time.
"""

from __future__ import annotations

import os

import datajoint as dj

from djsupervisor import DataJointWorker

from .tables import declare

PREFIX = os.environ["DJS_TEST_PREFIX"]
dj.config["safemode"] = False

pipe = declare(f"{PREFIX}_pipe")

standard = DataJointWorker("standard", f"{PREFIX}_workers", sleep_duration=1, db_prefix=PREFIX)
standard(pipe.Square)

other = DataJointWorker("other", f"{PREFIX}_workers", sleep_duration=1, db_prefix=PREFIX)
other(pipe.Cube)


def crash() -> None:
    """Die at once, like a worker whose code cannot get going."""
    os._exit(3)


crasher = DataJointWorker("crasher", f"{PREFIX}_workers", sleep_duration=1, db_prefix=PREFIX)
crasher(crash)
