"""Targets for config tests that need no database: a DataJointWorker (which connects only when run) and
attributes that are not workers."""

from djsupervisor import DataJointWorker

worker = DataJointWorker("offline", "offline_workers", sleep_duration=5)
same_worker = worker  # one instance under two names: discovered once
not_a_worker = 42
