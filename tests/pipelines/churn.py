"""A worker that ends after one short cycle, so its supervisor restarts it over and over."""

from __future__ import annotations

import os

from djsupervisor import DataJointWorker

PREFIX = os.environ["DJS_TEST_PREFIX"]

churn = DataJointWorker("churn", f"{PREFIX}_workers", run_duration=0.001, sleep_duration=0, db_prefix=PREFIX)
churn(lambda: 0)
